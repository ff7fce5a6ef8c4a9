//! The element-wise operations the decoder and the vision tower share, on flat f32
//! rows (`docs/qwen3-vl-reference.md` §2): RMSNorm, LayerNorm, rotate-half RoPE from a
//! cos/sin table, and the exact (erf) GELU. A leaf module: it imports neither model.

use rayon::prelude::*;

/// Elements per parallel task of the element-wise passes.
pub const ELEMS_PER_TASK: usize = 1 << 14;

/// `1 / sqrt(mean(x²) + eps)`: the RMSNorm scale of one row.
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ss: f32 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (ss + eps).sqrt()
}

/// `w · x / sqrt(mean(x²) + eps)` over each row of `x` into `out`.
pub fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let r = inv_rms(xr, eps);
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = g * (v * r);
        }
    }
}

/// [`rms_norm_rows`] of one row, in place (the per-head q/k norm).
pub fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let r = inv_rms(x, eps);
    for (v, &g) in x.iter_mut().zip(w) {
        *v = g * (*v * r);
    }
}

/// `(x − mean) / sqrt(var + eps) · w + b` over each `w.len()`-wide row of `x`, rows in
/// parallel.
pub fn layer_norm_rows(x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
    let n = w.len();
    let mut out = vec![0f32; x.len()];
    x.par_chunks(n)
        .zip(out.par_chunks_mut(n))
        .for_each(|(xr, or)| {
            let mean = xr.iter().sum::<f32>() / n as f32;
            let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n as f32;
            let r = 1.0 / (var + eps).sqrt();
            for (((o, &v), &g), &bb) in or.iter_mut().zip(xr).zip(w).zip(b) {
                *o = (v - mean) * r * g + bb;
            }
        });
    out
}

/// `x += y`, element by element.
pub fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Rotate-half RoPE of one head: `x·cos + rotate_half(x)·sin`, with cos/sin of the
/// first half repeated for the second.
pub fn rope(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    for j in 0..half {
        let (a, b) = (x[j], x[j + half]);
        x[j] = a * cos[j] - b * sin[j];
        x[j + half] = b * cos[j] + a * sin[j];
    }
}

/// cos and sin of every position's rotation angles, `[positions, half]` each (`half`
/// = head_dim / 2; the second half of a head reuses them).
pub struct RopeTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl RopeTable {
    /// The table of `angles` (`[positions, half]`, radians).
    pub fn from_angles(angles: impl IntoIterator<Item = f32>, half: usize) -> RopeTable {
        let (cos, sin) = angles.into_iter().map(|a| (a.cos(), a.sin())).unzip();
        RopeTable { cos, sin, half }
    }

    /// Rotates one head of position `pos` ([`rope`]).
    pub fn apply(&self, head: &mut [f32], pos: usize) {
        let at = pos * self.half..(pos + 1) * self.half;
        rope(head, &self.cos[at.clone()], &self.sin[at]);
    }
}

/// Exact (erf) GELU, the vision mergers' activation.
pub fn gelu_erf(x: f32) -> f32 {
    (0.5 * x as f64 * (1.0 + erf(x as f64 / std::f64::consts::SQRT_2))) as f32
}

/// erf in f64 (Numerical Recipes' erfc Chebyshev fit, relative error < 1.2e-7).
fn erf(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * poly.exp();
    if x >= 0.0 {
        1.0 - erfc
    } else {
        erfc - 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_is_accurate() {
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.520_499_877_8),
            (1.0, 0.842_700_792_9),
            (-2.0, -0.995_322_265),
            (3.0, 0.999_977_909_5),
        ] {
            assert!((erf(x) - want).abs() < 2e-7, "erf({x})");
        }
    }
}
