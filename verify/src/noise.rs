//! The logit noise a bundle may make, from the quantization arithmetic
//! (`docs/gates.md`, and the derivation in `gates/default.json`).
//!
//! At a prompt position with normed hidden state `h` (the oracle's `text.norm` row),
//! on each of the oracle's top-k tokens `i` with head row `w_i`:
//!
//! ```text
//! head     = Σ_d h_d² · var(e_id)                       rounding of the head itself
//! upstream = 2 (1 − cos_L) · |h|² · |w_i|² / H          what the last layer's gate lets through
//!                                                       (equal norms: RMSNorm fixes |h|)
//! σ²       = mean_i (head + upstream)
//! ```

use crate::error::Result;
use candle_core::Tensor;
use q3vl_model::{Qwen3VlConfig, WeightSource};
use serde::Serialize;

/// Per-element rounding variances of some rows of a stored weight.
pub trait RoundingVariance {
    /// `var(e)` of every element of rows `ids` of `name` (shape `shape`), row-major.
    fn rounding_variance(&self, name: &str, shape: [usize; 2], ids: &[u32]) -> Result<Vec<f64>>;
}

/// The variance of rounding `w` to f16: an error uniform over one ulp.
pub fn f16_rounding_variance(w: f32) -> f64 {
    let a = w.abs() as f64;
    // Below the smallest normal f16 (2^-14) the spacing is fixed at 2^-24.
    let ulp = if a < f64::powi(2.0, -14) {
        f64::powi(2.0, -24)
    } else {
        f64::powi(2.0, a.log2().floor() as i32 - 10)
    };
    ulp * ulp / 12.0
}

/// The allowance of one trace.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NoiseBudget {
    /// Allowed σ at each prompt position.
    pub allowed: Vec<f64>,
    /// The head's own rounding part of σ² at each prompt position.
    pub head_var: Vec<f64>,
    /// The head on the oracle's own normed state: its measured noise on the top-k
    /// (common shift removed) at each prompt position, the head's error alone.
    pub head_measured: Vec<f64>,
    /// Median allowed σ: what `logits.noise` holds the measurement to.
    pub sigma: f64,
    /// Mean allowed σ² (the KL allowance is half of it).
    pub mean_var: f64,
}

/// Computes the allowance at every prompt position. `norm` is the oracle's
/// `text.norm` `[T, H]`, `top_ids` its prompt top-k ids.
pub fn budget(
    cfg: &Qwen3VlConfig,
    src: &dyn WeightSource,
    rounding: &dyn RoundingVariance,
    norm: &Tensor,
    top: (&[Vec<i64>], &[Vec<f32>]),
    layer_cos: f64,
) -> Result<NoiseBudget> {
    let head = src.head_name(cfg);
    let shape = [cfg.text.vocab_size, cfg.text.hidden_size];
    let hs = norm.to_vec2::<f32>()?;
    let (mut allowed, mut head_var, mut head_measured) = (vec![], vec![], vec![]);
    for ((h, ids), z) in hs.iter().zip(top.0).zip(top.1) {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        let w = src
            .rows(head, shape, &ids)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let var = rounding.rounding_variance(head, shape, &ids)?;
        let (hv, up) = position_variance(h, &w, &var, layer_cos);
        head_var.push(hv);
        allowed.push((hv + up).sqrt());
        head_measured.push(head_error(h, &w, z));
    }
    let mean_var = allowed.iter().map(|s| s * s).sum::<f64>() / allowed.len().max(1) as f64;
    Ok(NoiseBudget {
        sigma: crate::stats::median(&allowed),
        allowed,
        head_var,
        head_measured,
        mean_var,
    })
}

/// The RMS over the top-k of `w_i · h − z_i`, common shift removed: our head on the
/// oracle's normed state against the oracle's logits.
fn head_error(h: &[f32], w: &[f32], z: &[f32]) -> f64 {
    let d: Vec<f64> = w
        .chunks(h.len().max(1))
        .zip(z)
        .map(|(wi, &zi)| {
            let dot: f64 = wi.iter().zip(h).map(|(&a, &b)| a as f64 * b as f64).sum();
            dot - zi as f64
        })
        .collect::<Vec<f64>>();
    crate::stats::rms_about_mean(&d)
}

/// (head, upstream) parts of σ² at one position: `w` and `var` are the top-k rows.
pub fn position_variance(h: &[f32], w: &[f32], var: &[f64], layer_cos: f64) -> (f64, f64) {
    let dim = h.len();
    let k = (w.len() / dim.max(1)).max(1);
    let h2: Vec<f64> = h.iter().map(|&x| (x as f64).powi(2)).collect();
    let hn2: f64 = h2.iter().sum();
    let (mut head, mut up) = (0.0, 0.0);
    for (wi, vi) in w.chunks(dim).zip(var.chunks(dim)) {
        head += h2.iter().zip(vi).map(|(a, b)| a * b).sum::<f64>();
        let wn2: f64 = wi.iter().map(|&x| (x as f64).powi(2)).sum();
        // Two unit states are at most 2 apart in 1 − cos (opposite directions).
        up += 2.0 * (1.0 - layer_cos).clamp(0.0, 2.0) * hn2 * wn2 / dim as f64;
    }
    (head / k as f64, up / k as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_ulps() {
        assert_eq!(f16_rounding_variance(1.0), f64::powi(2.0, -20) / 12.0);
        assert_eq!(f16_rounding_variance(-3.0), f64::powi(2.0, -18) / 12.0);
        assert_eq!(f16_rounding_variance(1e-6), f64::powi(2.0, -48) / 12.0);
    }

    #[test]
    fn head_part_sums_h_squared_times_variance_and_upstream_follows_the_layer_gate() {
        let h = [1.0f32, 2.0];
        let w = [1.0f32, 0.0, 0.0, 3.0];
        let var = [0.5, 0.25, 1.0, 0.0];
        // head: row 0: 1·0.5 + 4·0.25 = 1.5; row 1: 1·1 + 0 = 1; mean 1.25.
        // upstream: 2·(1−0.99)·|h|²=5 · |w|² (1, 9) / 2 → 0.05, 0.45; mean 0.25.
        let (hv, up) = position_variance(&h, &w, &var, 0.99);
        assert!(
            (hv - 1.25).abs() < 1e-12 && (up - 0.25).abs() < 1e-12,
            "{hv} {up}"
        );
        assert_eq!(position_variance(&h, &w, &var, 1.0).1, 0.0);
    }
}
