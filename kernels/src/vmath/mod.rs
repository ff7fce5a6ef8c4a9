//! Vectorized element-wise math: `exp`, softmax rows, SiLU·up and the tanh GELU.
//!
//! The AVX2 code (run on the AVX2 and AVX-512 paths) and the portable code run the
//! same IEEE operations in the same order (fused multiply-adds where the SIMD code
//! fuses), so they agree bit for bit (the tests check every path); results never
//! depend on threads.
//!
//! `exp(x)`: `n = round_even(x·log2 e)`, `r = x − n·ln2` (two-part ln2), the Cephes
//! polynomial `1 + r + r²·P(r)`, scaled by `2ⁿ`. Inputs are clamped to ≤ 88 and
//! inputs below −87 give 0. Relative error ≲ 2·10⁻⁷.

use crate::path::{best_path, debug_assert_available, Path};

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const P0: f32 = 1.987_569_1e-4;
const P1: f32 = 1.398_199_9e-3;
const P2: f32 = 8.333_452e-3;
const P3: f32 = 4.166_579_6e-2;
const P4: f32 = 1.666_666_5e-1;
const P5: f32 = 0.5;
const X_MAX: f32 = 88.0;
const X_MIN: f32 = -87.0;
/// √(2/π), the tanh GELU's constant.
const GELU_C: f32 = 0.797_884_6;

/// `exp(x)` on the portable path (the reference for the SIMD path).
#[inline]
pub fn exp_portable(x: f32) -> f32 {
    let small = x < X_MIN;
    let x = x.min(X_MAX);
    let n = (x * LOG2E).round_ties_even();
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    let mut p = P0;
    p = p.mul_add(r, P1);
    p = p.mul_add(r, P2);
    p = p.mul_add(r, P3);
    p = p.mul_add(r, P4);
    p = p.mul_add(r, P5);
    let y = p.mul_add(r * r, r) + 1.0;
    let scale = f32::from_bits(((n as i32).wrapping_add(127) as u32) << 23);
    if small {
        0.0
    } else {
        y * scale
    }
}

#[cfg(target_arch = "x86_64")]
mod x86;

/// The eight lane sums in the order the SIMD path reduces them.
#[inline]
fn sum_lanes(l: [f32; 8]) -> f32 {
    let s = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    (s[0] + s[2]) + (s[1] + s[3])
}

#[inline]
fn silu_mul_one(g: f32, u: f32) -> f32 {
    g / (1.0 + exp_portable(-g)) * u
}

#[inline]
fn gelu_tanh_one(v: f32) -> f32 {
    let u = GELU_C * 0.044715f32.mul_add(v * v * v, v);
    v / (1.0 + exp_portable(-2.0 * u))
}

/// `x[i] = exp(x[i])`.
pub fn exp_slice(x: &mut [f32]) {
    exp_slice_on(best_path(), x)
}

/// [`exp_slice`] on a given path (the AVX2 code also runs on the AVX-512 path), which
/// this CPU must run (checked in debug builds).
pub(crate) fn exp_slice_on(path: Path, x: &mut [f32]) {
    debug_assert_available(path);
    match path {
        // SAFETY: the path's features are present.
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 | Path::Avx512Vnni => unsafe { x86::exp_slice(x) },
        _ => {
            for v in x {
                *v = exp_portable(*v);
            }
        }
    }
}

/// In place, `row = softmax(row · scale)`: the max of the scaled values is
/// subtracted before `exp`; the sum runs over eight lanes in a fixed order.
pub fn softmax_row(row: &mut [f32], scale: f32) {
    softmax_row_on(best_path(), row, scale)
}

/// [`softmax_row`] on a given path, which this CPU must run (checked in debug builds).
pub(crate) fn softmax_row_on(path: Path, row: &mut [f32], scale: f32) {
    debug_assert_available(path);
    match path {
        // SAFETY: the path's features are present.
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 | Path::Avx512Vnni => unsafe { x86::softmax_row(row, scale) },
        _ => softmax_row_portable(row, scale),
    }
}

fn softmax_row_portable(row: &mut [f32], scale: f32) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v * scale));
    let n = row.len() / 8 * 8;
    let mut lanes = [0f32; 8];
    for c in row[..n].chunks_exact_mut(8) {
        for (l, v) in lanes.iter_mut().zip(c) {
            *v = exp_portable(*v * scale - max);
            *l += *v;
        }
    }
    let mut sum = sum_lanes(lanes);
    for v in &mut row[n..] {
        *v = exp_portable(*v * scale - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// `g[i] = silu(g[i]) · u[i]`, with `silu(x) = x / (1 + exp(−x))`.
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    silu_mul_on(best_path(), g, u)
}

/// [`silu_mul`] on a given path, which this CPU must run (checked in debug builds).
pub(crate) fn silu_mul_on(path: Path, g: &mut [f32], u: &[f32]) {
    debug_assert_available(path);
    assert_eq!(g.len(), u.len());
    match path {
        // SAFETY: the path's features are present; lengths are equal.
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 | Path::Avx512Vnni => unsafe { x86::silu_mul(g, u) },
        _ => {
            for (gv, uv) in g.iter_mut().zip(u) {
                *gv = silu_mul_one(*gv, *uv);
            }
        }
    }
}

/// In place, `gelu(x, approximate="tanh")` written as `x / (1 + exp(−2u))`,
/// `u = √(2/π)·(x + 0.044715·x³)` (the same function: `½(1 + tanh u) = σ(2u)`).
pub fn gelu_tanh(x: &mut [f32]) {
    gelu_tanh_on(best_path(), x)
}

/// [`gelu_tanh`] on a given path, which this CPU must run (checked in debug builds).
pub(crate) fn gelu_tanh_on(path: Path, x: &mut [f32]) {
    debug_assert_available(path);
    match path {
        // SAFETY: the path's features are present.
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 | Path::Avx512Vnni => unsafe { x86::gelu_tanh(x) },
        _ => {
            for v in x {
                *v = gelu_tanh_one(*v);
            }
        }
    }
}

#[cfg(test)]
mod tests;
