//! The small ops both towers share, written as `docs/qwen3-vl-reference.md` states
//! them.

use candle_core::{Result, Tensor, D};

/// `x·Wᵀ (+ b)` for `x: [..., in]`, `W: [out, in]`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.broadcast_matmul(&w.t()?)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// RMSNorm over the last dim: `w · x / sqrt(mean(x²) + eps)`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?
        .broadcast_mul(w)
}

/// LayerNorm over the last dim with weight and bias (biased variance, as torch).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(w)?
        .broadcast_add(b)
}

/// Softmax attention of `q: [heads, T, d]` over `k, v: [heads, S, d]` with an optional
/// additive mask `[T, S]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let mut s = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    if let Some(m) = mask {
        s = s.broadcast_add(m)?;
    }
    let p = candle_nn::ops::softmax_last_dim(&s)?;
    p.matmul(&v.contiguous()?)
}
