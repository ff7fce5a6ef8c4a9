//! The decoder's causal GQA attention of a pass's new queries over the KV cache
//! (`docs/qwen3-vl-reference.md` §4): `softmax(q kᵀ / √hd + causal mask) v`, query
//! head j reading key/value head j / groups. Heads run in parallel. A decode pass
//! (one token) takes fixed-order dot products; a prefill goes through the packed GEMM
//! in blocks of `QUERY_BLOCK` queries: scores, causal softmax, then `P · V`.

use crate::kernels::gemm::{gemm_serial, BSrc, MatMut, MatRef};
use crate::kernels::row::dot_f32;
use crate::kernels::vmath;
use crate::kv_cache::KvCache;
use rayon::prelude::*;

/// Prefill query rows per attention block (bounds the scores a thread holds).
const QUERY_BLOCK: usize = 64;

/// The attention heads of one layer.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (each shared by `heads / kv_heads` query heads).
    pub kv_heads: usize,
    /// Features per head.
    pub head_dim: usize,
}

impl AttentionShape {
    /// The scores' scale, `head_dim^-1/2`.
    fn scale(&self) -> f32 {
        (self.head_dim as f32).powf(-0.5)
    }
}

/// The queries of one forward pass.
#[derive(Debug, Clone, Copy)]
pub struct Queries {
    /// Positions already in the cache before the pass.
    pub past: usize,
    /// New tokens of the pass (all already written to the cache).
    pub tokens: usize,
    /// The first new token whose output is needed: the queries are rows
    /// `first_kept_row..tokens` (see [`crate::decoder::Rows`]).
    pub first_kept_row: usize,
}

impl Queries {
    /// Query rows computed.
    fn kept(&self) -> usize {
        self.tokens - self.first_kept_row
    }
}

/// Causal attention of `q` (`[kept, heads·hd]`, the pass's kept rows) over layer
/// `layer` of the cache; returns `[kept, heads·hd]`. A query's result does not
/// depend on `first_kept_row` (see `prefill_head`).
pub fn attention(
    cache: &KvCache,
    layer: usize,
    q: &[f32],
    shape: AttentionShape,
    queries: Queries,
) -> Vec<f32> {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim: hd,
    } = shape;
    let groups = heads / kv_heads;
    let scale = shape.scale();
    let per_head: Vec<Vec<f32>> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let (ks, vs) = cache.head(layer, h / groups, queries.past + queries.tokens);
            if queries.tokens == 1 {
                decode_head(&q[h * hd..(h + 1) * hd], ks, vs, scale)
            } else {
                prefill_head(q, h, ks, vs, shape, queries)
            }
        })
        .collect();
    interleave_heads(&per_head, queries.kept(), hd)
}

/// One head of one query over all `ks.len() / hd` cached keys, by dot products in
/// key order.
fn decode_head(qi: &[f32], ks: &[f32], vs: &[f32], scale: f32) -> Vec<f32> {
    let hd = qi.len();
    let n = ks.len() / hd;
    let mut out = vec![0f32; hd];
    let mut scores = vec![0f32; n];
    let mut max = f32::NEG_INFINITY;
    for (j, s) in scores.iter_mut().enumerate() {
        *s = dot_f32(qi, &ks[j * hd..(j + 1) * hd]) * scale;
        max = max.max(*s);
    }
    let mut sum = 0f32;
    for s in &mut scores {
        *s = (*s - max).exp();
        sum += *s;
    }
    for (j, &p) in scores.iter().enumerate() {
        for (ov, &vv) in out.iter_mut().zip(&vs[j * hd..(j + 1) * hd]) {
            *ov += p * vv;
        }
    }
    let inv = 1.0 / sum;
    for ov in out.iter_mut() {
        *ov *= inv;
    }
    out
}

/// Head `h` of the kept queries (`[kept, hd]`), block by block through the GEMM.
fn prefill_head(
    q: &[f32],
    h: usize,
    ks: &[f32],
    vs: &[f32],
    shape: AttentionShape,
    queries: Queries,
) -> Vec<f32> {
    let (nh, hd) = (shape.heads, shape.head_dim);
    let Queries {
        past,
        tokens: t,
        first_kept_row: first,
    } = queries;
    let scale = shape.scale();
    let mut out = vec![0f32; queries.kept() * hd];
    let mut scores = vec![0f32; QUERY_BLOCK.min(t) * (past + t)];
    let mut i0 = first;
    while i0 < t {
        // Blocks end where they would with every query present (at multiples of
        // QUERY_BLOCK), so each query sees the same `n` keys whatever `first`.
        let qb = (QUERY_BLOCK - i0 % QUERY_BLOCK).min(t - i0);
        // Keys visible to the block's last query.
        let n = past + i0 + qb;
        let s = &mut scores[..qb * n];
        gemm_serial(
            MatRef {
                data: &q[(i0 - first) * nh * hd + h * hd..],
                rows: qb,
                cols: hd,
                stride: nh * hd,
            },
            BSrc::F32 {
                data: ks,
                rs: hd,
                cs: 1,
            },
            MatMut {
                data: s,
                rows: qb,
                cols: n,
                stride: n,
            },
        );
        for (r, row) in s.chunks_exact_mut(n).enumerate() {
            let visible = past + i0 + r + 1;
            vmath::softmax_row(&mut row[..visible], scale);
            row[visible..].fill(0.0);
        }
        gemm_serial(
            MatRef {
                data: s,
                rows: qb,
                cols: n,
                stride: n,
            },
            BSrc::F32 {
                data: vs,
                rs: 1,
                cs: hd,
            },
            MatMut {
                data: &mut out[(i0 - first) * hd..(i0 - first + qb) * hd],
                rows: qb,
                cols: hd,
                stride: hd,
            },
        );
        i0 += qb;
    }
    out
}

/// Per-head outputs (`[heads][rows, hd]`) to `[rows, heads·hd]`.
fn interleave_heads(per_head: &[Vec<f32>], rows: usize, hd: usize) -> Vec<f32> {
    let nh = per_head.len();
    let mut out = vec![0f32; rows * nh * hd];
    for (h, ph) in per_head.iter().enumerate() {
        for i in 0..rows {
            out[(i * nh + h) * hd..(i * nh + h + 1) * hd]
                .copy_from_slice(&ph[i * hd..(i + 1) * hd]);
        }
    }
    out
}
