//! Comparing two tensors in float64: flattened cosine, per-token cosines and their
//! worst token, max absolute difference.

use crate::error::Result;
use candle_core::Tensor;

/// Cosine of two equally long vectors, accumulated in f64. Two zero vectors are
/// identical (1); one zero vector against a non-zero one is 0.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 && bb == 0.0 {
        return 1.0;
    }
    if aa == 0.0 || bb == 0.0 {
        return 0.0;
    }
    ab / (aa.sqrt() * bb.sqrt())
}

/// Cosine of two logits rows after removing each row's mean: softmax ignores a
/// common shift, and logits that all sit near 25 (a random model's) would make the
/// plain cosine 1 whatever the differences.
pub fn centered_cosine(a: &[f32], b: &[f32]) -> f64 {
    let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64;
    let (ma, mb) = (mean(a), mean(b));
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64 - ma, y as f64 - mb);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    match (aa == 0.0, bb == 0.0) {
        (true, true) => 1.0,
        (true, false) | (false, true) => 0.0,
        _ => ab / (aa.sqrt() * bb.sqrt()),
    }
}

/// How one tensor compares with the oracle's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Agreement {
    /// Cosine over the flattened tensors.
    pub cos: f64,
    /// Smallest per-row (per-token) cosine.
    pub min_token_cos: f64,
    /// Row where it occurs.
    pub min_token_pos: usize,
    /// Largest |a − b|.
    pub max_abs: f64,
}

/// Compares `ours` with `oracle` (same shape, rows = tokens).
///
/// A non-finite value on either side makes every figure NaN (the first such token is
/// the worst one), and NaN fails every `figure >= threshold` gate: a comparison that
/// sees NaN never passes.
pub fn agreement(ours: &[f32], oracle: &[f32], row: usize) -> Agreement {
    // 1 when there is no row at all.
    let mut min_token_cos = 1.0f64;
    let mut min_token_pos = 0;
    if row > 0 {
        for (i, (a, b)) in ours.chunks(row).zip(oracle.chunks(row)).enumerate() {
            let c = cosine(a, b);
            // `c < min` is false for NaN: test it first, and keep the first NaN.
            if !min_token_cos.is_nan() && (c.is_nan() || c < min_token_cos || i == 0) {
                min_token_cos = c;
                min_token_pos = i;
            }
        }
    }
    Agreement {
        cos: cosine(ours, oracle),
        min_token_cos,
        min_token_pos,
        max_abs: max_abs_diff(ours, oracle),
    }
}

/// Largest |a − b|, NaN when any difference is NaN (`f64::max` would skip it).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, |m, d| {
            if d.is_nan() || m.is_nan() {
                f64::NAN
            } else {
                m.max(d)
            }
        })
}

/// `|ours − oracle| / |oracle|` in f64 (0 when both are zero, ∞ when only the oracle
/// is): a cosine cannot see a change of scale, this can.
pub fn relative_error(ours: &[f32], oracle: &[f32]) -> f64 {
    let sq = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
    let err = sq(&mut ours.iter().zip(oracle).map(|(&a, &b)| a as f64 - b as f64));
    let norm = sq(&mut oracle.iter().map(|&b| b as f64));
    match (norm > 0.0, err == 0.0) {
        (true, _) => err / norm,
        (false, true) => 0.0,
        (false, false) => f64::INFINITY,
    }
}

/// A 2-D tensor's values, row-major, with its row width.
pub fn flat(t: &Tensor) -> Result<(Vec<f32>, usize)> {
    let row = *t.dims().last().unwrap_or(&1);
    Ok((t.flatten_all()?.to_vec1::<f32>()?, row))
}

/// `a − b` elementwise.
pub fn diff(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_is_computed_in_f64() {
        // In f32 a long sum of identical vectors can print cos > 1; here it is exactly 1.
        let a: Vec<f32> = (0..1_000_000).map(|i| ((i % 97) as f32).sin()).collect();
        let c = cosine(&a, &a);
        assert!((c - 1.0).abs() < 1e-12, "{c}");
        assert_eq!(cosine(&[1.0, 0.0], &[0.0, 1.0]), 0.0);
        assert!((cosine(&[1.0, 2.0], &[-1.0, -2.0]) + 1.0).abs() < 1e-12);
        assert_eq!(cosine(&[0.0], &[0.0]), 1.0);
    }

    #[test]
    fn the_relative_error_sees_a_scale() {
        assert!((relative_error(&[1.02, 2.04], &[1.0, 2.0]) - 0.02).abs() < 1e-6);
        assert_eq!(relative_error(&[0.0], &[0.0]), 0.0);
        assert_eq!(relative_error(&[1.0], &[0.0]), f64::INFINITY);
        assert!(relative_error(&[f32::NAN], &[1.0]).is_nan());
    }

    #[test]
    fn the_centered_cosine_ignores_a_common_shift() {
        let a = [25.0f32, 25.1, 24.9, 25.05];
        let b = [25.0f32, 24.9, 25.1, 25.05];
        assert!(cosine(&a, &b) > 0.9999);
        assert!(centered_cosine(&a, &b) < 0.0);
        let c: Vec<f32> = a.iter().map(|x| x + 3.0).collect();
        assert!((centered_cosine(&a, &c) - 1.0).abs() < 1e-9);
        assert!(centered_cosine(&a, &[f32::NAN, 0.0, 0.0, 0.0]).is_nan());
    }

    #[test]
    fn non_finite_values_never_pass() {
        let a = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0];
        for bad in [f32::NAN, f32::INFINITY] {
            let mut b = a;
            b[3] = bad;
            let g = agreement(&a, &b, 2);
            assert!(g.cos.is_nan(), "{g:?}");
            assert!(g.min_token_cos.is_nan() && g.min_token_pos == 1, "{g:?}");
            // How every gate reads a figure.
            let passes = |x: f64| x >= 0.9;
            assert!(!passes(g.cos) && !passes(g.min_token_cos), "{g:?}");
            let g = agreement(&b, &a, 2);
            assert!(g.min_token_cos.is_nan(), "{g:?}");
        }
        let mut b = a;
        b[5] = f32::NAN;
        assert!(max_abs_diff(&a, &b).is_nan());
        assert!(max_abs_diff(&b, &a).is_nan());
        assert_eq!(max_abs_diff(&a, &a), 0.0);
    }

    #[test]
    fn worst_token_is_located() {
        let a = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0];
        let b = [1.0, 0.0, 0.0, 1.0, 1.0, 0.1];
        let g = agreement(&a, &b, 2);
        assert_eq!(g.min_token_pos, 1);
        assert!(g.min_token_cos.abs() < 1e-12);
        assert!((g.max_abs - 1.0).abs() < 1e-12);
    }
}
