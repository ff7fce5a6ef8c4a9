//! The vision tower's full (non-causal) attention of one image: RoPE on q and k,
//! `softmax(q kᵀ / √hd) v`. First, per head in parallel, the queries are rotated, K
//! packed and V packed (transposed) once; then every (head, block of
//! `QUERY_BLOCK` queries) is its own task, so a thread holds one block's scores at a
//! time and the two cores stay balanced (16 heads alone split unevenly whenever one
//! core runs slower).

use crate::kernels::gemm::{gemm_serial_packed, gemm_serial_packed_a, BSrc, PackedA, PackedB};
use crate::kernels::vmath;
use crate::ops::RopeTable;
use rayon::prelude::*;

/// Query rows per attention block: one block's scores (`QUERY_BLOCK × P`) stay in L2.
pub(crate) const QUERY_BLOCK: usize = 96;

/// One head's operands, prepared once for all its query blocks.
struct Head {
    /// Rotated queries `[P, hd]`.
    q: Vec<f32>,
    /// Rotated keys, packed as the scores' B (`B[j, kk] = k[j, kk]`).
    k: PackedB,
    /// `vᵀ`, packed as the output product's A.
    vt: PackedA,
}

/// Attention of `qkv` (`[P, 3·heads·hd]`, features `[q | k | v]`, each head-major)
/// with the patches' rotations `rope`; returns `[P, heads·hd]`.
pub fn vision_attention(
    qkv: &[f32],
    p: usize,
    heads: usize,
    hd: usize,
    rope: &RopeTable,
) -> Vec<f32> {
    let prepared: Vec<Head> = (0..heads)
        .into_par_iter()
        .map(|h| prepare_head(qkv, p, heads, hd, rope, h))
        .collect();
    let qblocks = p.div_ceil(QUERY_BLOCK);
    let blocks: Vec<Vec<f32>> = (0..heads * qblocks)
        .into_par_iter()
        .map_init(
            || vec![0f32; QUERY_BLOCK.min(p) * p],
            |scores, task| {
                let head = &prepared[task / qblocks];
                attend_block(head, (task % qblocks) * QUERY_BLOCK, p, hd, scores)
            },
        )
        .collect();
    gather(&blocks, p, heads, hd)
}

/// Head `h`'s rotated queries, packed rotated keys and packed `vᵀ`.
fn prepare_head(
    qkv: &[f32],
    p: usize,
    heads: usize,
    hd: usize,
    rope: &RopeTable,
    h: usize,
) -> Head {
    let d = heads * hd;
    let mut q = vec![0f32; p * hd];
    let mut k = vec![0f32; p * hd];
    for i in 0..p {
        let row = &qkv[i * 3 * d..(i + 1) * 3 * d];
        q[i * hd..(i + 1) * hd].copy_from_slice(&row[h * hd..(h + 1) * hd]);
        k[i * hd..(i + 1) * hd].copy_from_slice(&row[d + h * hd..d + (h + 1) * hd]);
        rope.apply(&mut q[i * hd..(i + 1) * hd], i);
        rope.apply(&mut k[i * hd..(i + 1) * hd], i);
    }
    let k = PackedB::new(
        BSrc::F32 {
            data: &k,
            rs: hd,
            cs: 1,
        },
        p,
        hd,
    );
    // A = vᵀ for the output product (see `attend_block`), packed once for all query
    // blocks straight from V's columns of `qkv`.
    let vt = PackedA::from_transposed(&qkv[2 * d + h * hd..], hd, p, 3 * d);
    Head { q, k, vt }
}

/// The queries `q0..q0 + QUERY_BLOCK` (fewer in the last block) of one head against
/// all `p` keys, in `scores`' room; returns the block's output transposed, `[hd][qb]`.
fn attend_block(head: &Head, q0: usize, p: usize, hd: usize, scores: &mut [f32]) -> Vec<f32> {
    let scale = (hd as f32).powf(-0.5);
    let qb = QUERY_BLOCK.min(p - q0);
    let s = &mut scores[..qb * p];
    gemm_serial_packed(&head.q[q0 * hd..], qb, hd, &head.k, s, p);
    for row in s.chunks_exact_mut(p) {
        vmath::softmax_row(row, scale);
    }
    // The output transposed, oᵀ = vᵀ · sᵀ (`[hd][qb]`): for hd = 72 its tiles are all
    // full (72 = 12 × 6 rows, 96 = 6 × 16 columns), where o = s · v would leave the
    // last 16-column panel half empty. Each element is the same fused chain over the
    // keys either way (a · b = b · a exactly).
    let mut ot = vec![0f32; hd * qb];
    gemm_serial_packed_a(
        &head.vt,
        BSrc::F32 {
            data: s,
            rs: p,
            cs: 1,
        },
        qb,
        &mut ot,
        qb,
    );
    ot
}

/// The blocks' transposed outputs (`[head][block]`) back to `[P, heads·hd]`, in
/// parallel over query rows: token i of head h is column i − q0 of its block's oᵀ.
fn gather(blocks: &[Vec<f32>], p: usize, heads: usize, hd: usize) -> Vec<f32> {
    let qblocks = p.div_ceil(QUERY_BLOCK);
    let mut out = vec![0f32; p * heads * hd];
    out.par_chunks_mut(heads * hd)
        .enumerate()
        .for_each(|(i, row)| {
            let (qi, c) = (i / QUERY_BLOCK, i % QUERY_BLOCK);
            for (h, dst) in row.chunks_exact_mut(hd).enumerate() {
                let o = &blocks[h * qblocks + qi];
                let qb = o.len() / hd;
                for (r, v) in dst.iter_mut().enumerate() {
                    *v = o[r * qb + c];
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `vision_attention` against softmax(q kᵀ/√hd) v in f64, with the rotation
    /// applied the same way, on the 8B head size (72: the transposed output
    /// product's full tiles) and more queries than one block (a short last block).
    #[test]
    fn attention_matches_naive() {
        let (p, heads, hd) = (QUERY_BLOCK + 7, 2usize, 72usize);
        let d = heads * hd;
        let qkv: Vec<f32> = (0..p * 3 * d)
            .map(|i| ((i * 7919) % 1999) as f32 * 1e-3 - 1.0)
            .collect();
        let half = hd / 2;
        let rope = RopeTable::from_angles((0..p * half).map(|i| i as f32 * 0.01), half);
        let got = vision_attention(&qkv, p, heads, hd, &rope);
        for h in 0..heads {
            let rot = |off: usize, i: usize| {
                let mut v = qkv[i * 3 * d + off + h * hd..i * 3 * d + off + (h + 1) * hd].to_vec();
                rope.apply(&mut v, i);
                v
            };
            let ks: Vec<Vec<f32>> = (0..p).map(|j| rot(d, j)).collect();
            for i in 0..p {
                let q = rot(0, i);
                let s: Vec<f64> = ks
                    .iter()
                    .map(|k| {
                        q.iter()
                            .zip(k)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = s.iter().map(|v| (v - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for r in 0..hd {
                    let want: f64 = (0..p)
                        .map(|j| e[j] / z * qkv[j * 3 * d + 2 * d + h * hd + r] as f64)
                        .sum();
                    let g = got[i * d + h * hd + r] as f64;
                    assert!(
                        (g - want).abs() < 1e-5,
                        "head {h} query {i} dim {r}: {g} vs {want}"
                    );
                }
            }
        }
    }
}
