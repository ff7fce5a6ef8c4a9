//! Zero-copy views of a bundle's weights, as the kernels consume them.

use crate::error::{EngineError, Result};
use crate::kernels::row::{dot_f32, widen_f16};
use half::f16;
use q3vl_bundle::{Bundle, Dtype};
use rayon::prelude::*;

// The bundle format's block and the kernels' block are one number, defined where each
// crate needs it (the kernels depend on nothing); this is where the two meet.
const _: () = assert!(q3vl_bundle::BLOCK == crate::kernels::BLOCK);

/// f16 weight rows per parallel task; any value gives the same numbers, since each
/// output is one whole dot product.
const ROWS_PER_TASK: usize = 16;

/// Which arithmetic a forward pass's int8 products use. The prefill GEMM and the
/// decode matrix-vector kernel round differently, so the choice belongs to the pass,
/// not to the number of rows a product has (a prefill's last layer computes one row,
/// in the prefill's arithmetic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Several new tokens at once: the int16-activation GEMM.
    Prefill,
    /// One new token: the int16-activation matrix-vector kernel.
    Decode,
}

impl Pass {
    /// The pass that runs `t` new tokens.
    pub fn of(t: usize) -> Pass {
        if t == 1 {
            Pass::Decode
        } else {
            Pass::Prefill
        }
    }
}

/// A linear layer's weight `[rows = out, cols = in]`, borrowed from the memory map.
#[derive(Clone, Copy)]
pub enum Lin<'a> {
    /// int8 per-block-32 with f16 scales (int8 modes).
    Q8 {
        /// `rows × cols` values.
        q: &'a [i8],
        /// `rows × cols/32` scales.
        s: &'a [f16],
        /// Output features.
        rows: usize,
        /// Input features.
        cols: usize,
    },
    /// f16 (fp16 mode, the int8lin head, a tied embedding used as head).
    F16 {
        /// `rows × cols` values.
        w: &'a [f16],
        /// Output features.
        rows: usize,
        /// Input features.
        cols: usize,
    },
}

/// Reinterprets little-endian f16 bytes; None when misaligned.
pub fn f16_slice(bytes: &[u8]) -> Option<&[f16]> {
    // SAFETY: f16 is a transparent u16; every bit pattern is valid.
    let (pre, s, post) = unsafe { bytes.align_to::<f16>() };
    (pre.is_empty() && post.is_empty()).then_some(s)
}

impl<'a> Lin<'a> {
    /// Resolves `name` in `b`, checking it is `[rows, cols]`.
    pub fn resolve(b: &'a Bundle, name: &str, rows: usize, cols: usize) -> Result<Lin<'a>> {
        let bad = |msg: String| EngineError::Tensor {
            name: name.into(),
            msg: format!("{msg} (in {})", b.dir().display()),
        };
        if let Some((q, s, shape)) = b.q8(name) {
            if shape != [rows, cols] {
                return Err(bad(format!(
                    "is {shape:?}, the config needs [{rows}, {cols}]"
                )));
            }
            return Ok(Lin::Q8 { q, s, rows, cols });
        }
        let (dtype, shape, bytes) = b.raw(name)?;
        if shape != [rows, cols] {
            return Err(bad(format!(
                "is {shape:?}, the config needs [{rows}, {cols}]"
            )));
        }
        if dtype != Dtype::F16 {
            return Err(bad(format!(
                "is {dtype}; the engine reads int8 or F16 weights"
            )));
        }
        let w = f16_slice(bytes).ok_or_else(|| bad("is not 2-byte aligned".into()))?;
        Ok(Lin::F16 { w, rows, cols })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        match *self {
            Lin::Q8 { rows, .. } | Lin::F16 { rows, .. } => rows,
        }
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        match *self {
            Lin::Q8 { cols, .. } | Lin::F16 { cols, .. } => cols,
        }
    }

    /// `out[t, r] = Σ_c x[t, c] · W[r, c]` for `t` tokens, in `pass`'s arithmetic.
    /// For int8 weights a decode pass goes through the streaming matrix-vector
    /// kernel on int16 block-quantized activations ([`crate::kernels::matvec`]), a
    /// prefill pass through the int8 × int16 GEMM over all its rows at once, its
    /// activations quantized the same way ([`crate::kernels::gemm16`]).
    /// Rows or columns are split across the pool's threads; each output is one
    /// fixed-order reduction, whatever the thread count or the number of rows.
    pub fn matmul(&self, pass: Pass, x: &[f32], t: usize, out: &mut [f32]) {
        let (rows, cols) = (self.rows(), self.cols());
        assert_eq!(x.len(), t * cols);
        assert_eq!(out.len(), t * rows);
        match *self {
            Lin::Q8 { q, s, .. } => match pass {
                Pass::Decode => crate::kernels::matvec::matvec(q, s, rows, cols, x, out),
                Pass::Prefill => crate::kernels::gemm16::linear_w8a16(x, t, cols, q, s, rows, out),
            },
            Lin::F16 { w, .. } => {
                // Row-major by weight row, so each task owns a contiguous piece.
                let mut tr = vec![0f32; rows * t];
                tr.par_chunks_mut(ROWS_PER_TASK * t)
                    .enumerate()
                    .for_each(|(c, chunk)| {
                        let mut row = vec![0f32; cols];
                        for (i, o) in chunk.chunks_mut(t).enumerate() {
                            let r = c * ROWS_PER_TASK + i;
                            widen_f16(&w[r * cols..(r + 1) * cols], &mut row);
                            for (tok, ov) in o.iter_mut().enumerate() {
                                *ov = dot_f32(&row, &x[tok * cols..(tok + 1) * cols]);
                            }
                        }
                    });
                for r in 0..rows {
                    for tok in 0..t {
                        out[tok * rows + r] = tr[r * t + tok];
                    }
                }
            }
        }
    }

    /// Bytes read from memory per use (weights and scales).
    pub fn bytes(&self) -> usize {
        match *self {
            Lin::Q8 { q, s, .. } => q.len() + 2 * s.len(),
            Lin::F16 { w, .. } => 2 * w.len(),
        }
    }
}

/// A small tensor (norm weights, biases, the position table) as f32, length-checked.
pub fn vector(b: &Bundle, name: &str, len: usize) -> Result<Vec<f32>> {
    let v = b.dequantized(name)?;
    if v.len() != len {
        return Err(EngineError::Tensor {
            name: name.into(),
            msg: format!(
                "has {} values, the config needs {len} (in {})",
                v.len(),
                b.dir().display()
            ),
        });
    }
    Ok(v)
}

/// An f16 tensor of `shape` (vision weights), zero-copy.
pub fn f16_tensor<'a>(b: &'a Bundle, name: &str, shape: &[usize]) -> Result<&'a [f16]> {
    let (dtype, found, bytes) = b.raw(name)?;
    let bad = |msg: String| EngineError::Tensor {
        name: name.into(),
        msg: format!("{msg} (in {})", b.dir().display()),
    };
    let n: usize = shape.iter().product();
    let found_n: usize = found.iter().product();
    if found_n != n || (found.len() == shape.len() && found != shape) {
        return Err(bad(format!("is {found:?}, the config needs {shape:?}")));
    }
    if dtype != Dtype::F16 {
        return Err(bad(format!("is {dtype}, expected F16")));
    }
    f16_slice(bytes).ok_or_else(|| bad("is not 2-byte aligned".into()))
}
