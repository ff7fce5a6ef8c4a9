//! f16 weights × f32 activations: the LM head and body in the `int8lin`/`fp16` modes,
//! and the f32 dot products of attention.
//!
//! Weights are widened to f32 one row at a time, right before use, so no f32 copy of
//! a tensor is kept.

use half::f16;
use half::slice::HalfFloatSliceExt;
use std::sync::OnceLock;

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

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// AVX2+FMA f32 dot: one 8-lane FMA accumulator, lanes summed in order, then the tail.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let full = n / 8 * 8;
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i < full {
            acc = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
                acc,
            );
            i += 8;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        let mut s = 0f32;
        for l in lanes {
            s += l;
        }
        for j in full..n {
            s += a[j] * b[j];
        }
        s
    }
}

type F32Dot = unsafe fn(&[f32], &[f32]) -> f32;

unsafe fn portable_fn(a: &[f32], b: &[f32]) -> f32 {
    dot_f32_portable(a, b)
}

fn f32_kernel() -> F32Dot {
    static F: OnceLock<F32Dot> = OnceLock::new();
    *F.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::path::avx2() {
                return x86::dot_f32_avx2;
            }
        }
        portable_fn
    })
}

/// `Σ a[i]·b[i]` over the shorter length, on the best path of this CPU (fixed per
/// machine, independent of threads).
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: the kernel was chosen by runtime feature detection; lengths are clamped.
    unsafe { f32_kernel()(a, b) }
}

/// Widens an f16 row into `out` (same length).
pub fn widen(src: &[f16], out: &mut [f32]) {
    src.convert_to_f32_slice(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_dot_matches_portable_closely() {
        for n in [1usize, 7, 8, 9, 64, 72, 100] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot_f32(&a, &b) as f64 - exact).abs() < 1e-4);
            assert!((dot_f32_portable(&a, &b) as f64 - exact).abs() < 1e-4);
        }
    }
}
