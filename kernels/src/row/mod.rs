//! One-row f32 primitives: the dot product of the LM head (f16 weights in the
//! `int8lin`/`fp16` modes, widened a row at a time) and of decode attention, and the
//! f16 → f32 widening of a row (embeddings, LM head rows, the f32 GEMM's f16 packing).
//!
//! Weights are widened to f32 one row at a time, right before use, so no f32 copy of
//! a tensor is kept.
//!
//! # The arithmetic
//!
//! [`dot_f32`]: eight lane accumulators (`lane[l] += a[8c + l] · b[8c + l]` over the
//! full chunks `c`), then the lanes summed in order, then the tail added in order.
//! The portable path rounds each product and sum; the AVX2 path fuses them (FMA), so
//! the two agree to rounding, not bit for bit. [`widen_f16`] is exact on every path.

use crate::path::{best_path, debug_assert_available, Path};
use half::f16;
use half::slice::HalfFloatSliceExt;

#[cfg(target_arch = "x86_64")]
mod x86;

/// Lanes of the portable accumulator; the AVX2 path has the same lane layout.
const LANES: usize = 8;

/// Portable f32 dot: 8 lane accumulators, then the lanes summed in order, then the tail.
pub fn dot_f32_portable(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut lanes = [0f32; LANES];
    let full = n / LANES * LANES;
    for (ca, cb) in a[..full]
        .chunks_exact(LANES)
        .zip(b[..full].chunks_exact(LANES))
    {
        for l in 0..LANES {
            lanes[l] += ca[l] * cb[l];
        }
    }
    let mut s = 0f32;
    for l in lanes {
        s += l;
    }
    for i in full..n {
        s += a[i] * b[i];
    }
    s
}

/// `Σ a[i]·b[i]` over the shorter length, on the best path of this CPU (fixed per
/// machine, independent of threads).
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    dot_f32_on(best_path(), a, b)
}

/// [`dot_f32`] on a given path (the AVX2 code also runs on the AVX-512 path), which
/// this CPU must run (checked in debug builds).
#[inline]
pub(crate) fn dot_f32_on(path: Path, a: &[f32], b: &[f32]) -> f32 {
    debug_assert_available(path);
    match path {
        // SAFETY: the path's features are present (the callers pass the detected
        // path or one of `available_paths`); lengths are clamped.
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 | Path::Avx512Vnni => unsafe { x86::dot_f32_avx2(a, b) },
        _ => dot_f32_portable(a, b),
    }
}

/// Widens an f16 row into `dst` (same length; exact), on the best path of this CPU.
pub fn widen_f16(src: &[f16], dst: &mut [f32]) {
    widen_f16_on(best_path(), src, dst)
}

/// [`widen_f16`] on a given path, which this CPU must run (checked in debug builds):
/// F16C eight values at a time on x86 (AVX2 and AVX-512 paths), `half`'s conversion
/// elsewhere.
pub(crate) fn widen_f16_on(path: Path, src: &[f16], dst: &mut [f32]) {
    debug_assert_available(path);
    assert_eq!(src.len(), dst.len());
    match path {
        // SAFETY: lengths are equal; the path's features are present.
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 | Path::Avx512Vnni => unsafe {
            x86::widen_f16c(src.as_ptr(), dst.as_mut_ptr(), src.len())
        },
        _ => src.convert_to_f32_slice(dst),
    }
}

#[cfg(test)]
mod tests;
