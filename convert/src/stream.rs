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
use safetensors::Dtype;

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

/// The first non-finite value and its index (offset by `base`).
#[inline(always)]
fn first_nonfinite(v: &[f32], base: usize) -> Option<(usize, f32)> {
    // A branch-free fold first (it vectorizes), the search only when it is needed.
    let bad = v.iter().fold(false, |acc, x| acc | !x.is_finite());
    if !bad {
        return None;
    }
    v.iter()
        .position(|x| !x.is_finite())
        .map(|i| (base + i, v[i]))
}

/// A piece of one source tensor: its raw bytes and the flat index of its first value.
#[derive(Clone, Copy)]
struct Row<'a> {
    name: &'a str,
    dtype: Dtype,
    src: &'a [u8],
    at: usize,
}

/// Widens, checks and quantizes one row (`scale_overflow` holds `(0, block)`).
#[inline(always)]
fn int8_row_body(row: Row, buf: &mut [f32], kind: QuantKind, q: &mut [i8], s: &mut [f16]) -> Found {
    let mut f = Found::default();
    if widen_into(row.name, row.dtype, row.src, buf).is_err() {
        return f;
    }
    f.nonfinite = first_nonfinite(buf, row.at);
    if f.nonfinite.is_none() {
        let rep = quantize_row(buf, kind, q, s);
        f.underflow = rep.zero_scale_blocks as u64;
        f.scale_overflow = rep.scale_overflow.map(|b| (0, b));
    }
    f
}

/// Widens, checks and narrows one task's values to f16 bytes.
#[inline(always)]
fn f16_task_body(row: Row, vals: &mut [f32], out: &mut [u8]) -> Found {
    let mut f = Found::default();
    if widen_into(row.name, row.dtype, row.src, vals).is_err() {
        return f;
    }
    f.nonfinite = first_nonfinite(vals, row.at);
    let rep = narrow_into(vals, out);
    f.underflow = rep.underflow;
    f.overflow = rep.overflow.map(|j| (row.at + j, vals[j]));
    f
}

// The same loops compiled for AVX2: the converter's arithmetic is plain IEEE float
// and integer work without fused operations, so wider vectors give the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn int8_row_avx2(
    row: Row,
    buf: &mut [f32],
    kind: QuantKind,
    q: &mut [i8],
    s: &mut [f16],
) -> Found {
    int8_row_body(row, buf, kind, q, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn f16_task_avx2(row: Row, vals: &mut [f32], out: &mut [u8]) -> Found {
    f16_task_body(row, vals, out)
}

/// Whether the AVX2 builds of the row loops can run here.
fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX2.get_or_init(|| is_x86_feature_detected!("avx2"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// [`int8_row_body`], in its AVX2 build where the CPU has it.
fn int8_row(row: Row, buf: &mut [f32], kind: QuantKind, q: &mut [i8], s: &mut [f16]) -> Found {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU supports AVX2 (checked at run time).
        return unsafe { int8_row_avx2(row, buf, kind, q, s) };
    }
    int8_row_body(row, buf, kind, q, s)
}

/// [`f16_task_body`], in its AVX2 build where the CPU has it.
fn f16_task(row: Row, vals: &mut [f32], out: &mut [u8]) -> Found {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU supports AVX2 (checked at run time).
        return unsafe { f16_task_avx2(row, vals, out) };
    }
    f16_task_body(row, vals, out)
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
        let chunk = Chunk {
            t,
            dtype,
            es,
            cols,
            r0,
            rows: r1 - r0,
            src: &bytes[range.clone()],
        };
        match t.scheme {
            Scheme::Int8Clip | Scheme::Int8AbsMax => stats.scale_underflow += chunk.int8(w)?,
            Scheme::F16 => stats.f16_underflow += chunk.f16(w)?,
            Scheme::F32 => chunk.f32(w)?,
        }
        ck.release(&t.source, range.clone());
        progress.advance(range.len() as u64);
        r0 = r1;
    }
    Ok(stats)
}

/// Rows `r0 .. r0 + rows` of tensor `t`'s source, as stored.
struct Chunk<'a> {
    t: &'a OutTensor,
    dtype: Dtype,
    /// Bytes per source value.
    es: usize,
    cols: usize,
    r0: usize,
    rows: usize,
    src: &'a [u8],
}

impl Chunk<'_> {
    /// The flat index of the chunk's first value.
    fn base(&self) -> usize {
        self.r0 * self.cols
    }

    /// Quantizes the rows on all cores and writes them and their scales; returns
    /// the blocks whose scale flushed to zero.
    fn int8(&self, w: &mut WeightsWriter) -> Result<u64> {
        let (t, cols) = (self.t, self.cols);
        let kind = QuantKind::of(t.scheme).expect("int8 scheme");
        let nb = cols / BLOCK;
        let mut q = vec![0i8; self.src.len() / self.es];
        let mut s = vec![f16::ZERO; self.rows * nb];
        let found = q
            .par_chunks_mut(cols)
            .zip(s.par_chunks_mut(nb))
            .zip(self.src.par_chunks(cols * self.es))
            .enumerate()
            .map_init(
                || vec![0f32; cols],
                |buf, (i, ((qrow, srow), srcrow))| {
                    let row = Row {
                        name: &t.source,
                        dtype: self.dtype,
                        src: srcrow,
                        at: self.base() + i * cols,
                    };
                    let mut f = int8_row(row, buf, kind, qrow, srow);
                    f.scale_overflow = f.scale_overflow.map(|(_, b)| (self.r0 + i, b));
                    f
                },
            )
            .reduce(Found::default, Found::merge);
        report(t, &found)?;
        w.write(&t.name, i8_bytes(q))?;
        w.write(
            &scales_name(&t.name),
            s.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )?;
        Ok(found.underflow)
    }

    /// Narrows the values to f16 on all cores and writes them; returns the nonzero
    /// values that became subnormal or zero.
    fn f16(&self, w: &mut WeightsWriter) -> Result<u64> {
        let es = self.es;
        let mut out = vec![0u8; self.src.len() / es * 2];
        let found = out
            .par_chunks_mut(TASK_ELEMS * 2)
            .zip(self.src.par_chunks(TASK_ELEMS * es))
            .enumerate()
            .map_init(
                || vec![0f32; TASK_ELEMS],
                |buf, (i, (o, sb))| {
                    let row = Row {
                        name: &self.t.source,
                        dtype: self.dtype,
                        src: sb,
                        at: self.base() + i * TASK_ELEMS,
                    };
                    f16_task(row, &mut buf[..sb.len() / es], o)
                },
            )
            .reduce(Found::default, Found::merge);
        report(self.t, &found)?;
        w.write(&self.t.name, out)?;
        Ok(found.underflow)
    }

    /// Widens the values to f32 and writes them.
    fn f32(&self, w: &mut WeightsWriter) -> Result<()> {
        let t = self.t;
        let mut vals = vec![0f32; self.src.len() / self.es];
        widen_into(&t.source, self.dtype, self.src, &mut vals)?;
        let found = Found {
            nonfinite: first_nonfinite(&vals, self.base()),
            ..Found::default()
        };
        report(t, &found)?;
        w.write(&t.name, vals.iter().flat_map(|x| x.to_le_bytes()).collect())?;
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// bf16 bytes of a row with every kind of block: random magnitudes over many
    /// decades, exact .5 ties of the scale, zeros, tiny values whose scale flushes,
    /// and values at the f16 limits.
    fn bf16_row(cols: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        (0..cols)
            .map(|c| {
                let r = next();
                let v = match (c / 32) % 5 {
                    0 => f32::from_bits(
                        ((r >> 32) as u32 & 0x807f_ffff) | (((r % 40) as u32 + 100) << 23),
                    ),
                    1 => ((r % 511) as f32 - 255.0) * 0.5,
                    2 => 0.0,
                    3 => ((r % 7) as f32 - 3.0) * 1e-9,
                    _ => ((r % 3) as f32 - 1.0) * 65504.0,
                };
                (v.to_bits() >> 16) as u16
            })
            .flat_map(|h| h.to_le_bytes())
            .collect()
    }

    #[test]
    fn simd_builds_of_the_row_loops_give_the_same_bytes() {
        let cols = 32 * 40;
        for seed in 0..20 {
            let src = bf16_row(cols, seed);
            let row = Row {
                name: "t",
                dtype: Dtype::BF16,
                src: &src,
                at: 0,
            };
            for kind in [QuantKind::Clip, QuantKind::AbsMax] {
                let (mut q1, mut s1) = (vec![0i8; cols], vec![f16::ZERO; cols / BLOCK]);
                let (mut q2, mut s2) = (q1.clone(), s1.clone());
                let mut buf = vec![0f32; cols];
                let f1 = int8_row_body(row, &mut buf, kind, &mut q1, &mut s1);
                let f2 = int8_row(row, &mut buf, kind, &mut q2, &mut s2);
                assert_eq!(q1, q2, "seed {seed} {kind:?}");
                let bits = |s: &[f16]| s.iter().map(|h| h.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&s1), bits(&s2), "seed {seed} {kind:?}");
                assert_eq!(format!("{f1:?}"), format!("{f2:?}"));
                assert!(f1.underflow > 0, "the row has flushed scales");
            }
            let (mut o1, mut o2) = (vec![0u8; cols * 2], vec![0u8; cols * 2]);
            let mut vals = vec![0f32; cols];
            let f1 = f16_task_body(row, &mut vals, &mut o1);
            let f2 = f16_task(row, &mut vals, &mut o2);
            assert_eq!(o1, o2, "seed {seed}");
            assert_eq!(format!("{f1:?}"), format!("{f2:?}"));
        }
    }

    #[test]
    fn a_non_finite_value_is_found_at_its_index() {
        let mut src = bf16_row(64, 1);
        src[2 * 37..2 * 38].copy_from_slice(&((f32::NAN.to_bits() >> 16) as u16).to_le_bytes());
        let row = Row {
            name: "t",
            dtype: Dtype::BF16,
            src: &src,
            at: 1000,
        };
        let mut buf = vec![0f32; 64];
        let (mut q, mut s) = (vec![0i8; 64], vec![f16::ZERO; 2]);
        let f = int8_row(row, &mut buf, QuantKind::Clip, &mut q, &mut s);
        assert_eq!(f.nonfinite.map(|(i, _)| i), Some(1037));
    }
}
