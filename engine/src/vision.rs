//! The vision tower on f16 weights with f32 arithmetic (`docs/qwen3-vl-reference.md`
//! §3): patch embed, interpolated position embedding, 2D RoPE ViT blocks, DeepStack
//! mergers and the main merger. Every linear runs all patches at once through the packed
//! GEMM ([`crate::kernels::gemm::linear_f16_vec`]), which widens each f16 weight tile
//! to f32 while packing it, so no f32 copy of the tower is kept.

use crate::error::{EngineError, Result};
use crate::kernels::gemm::{
    gemm_serial_packed, gemm_serial_packed_a, linear_f16_vec, BSrc, PackedA, PackedB,
};
use crate::kernels::vmath;
use crate::weights::{f16_tensor, vector};
use q3vl_bundle::Bundle;
use q3vl_model::config::VisionConfig;
use q3vl_model::layout::{deepstack, vision_block, visual};
use q3vl_model::rope::{inv_freq, vision_patch_coords};
use q3vl_model::vision::interpolate_pos_embed;
use rayon::prelude::*;

/// LayerNorm epsilon of every vision norm.
const LN_EPS: f32 = 1e-6;

/// One image's features for the decoder, computed once per image.
#[derive(Debug, Clone)]
pub struct ImageFeatures {
    /// `[N, H]` image token embeddings (main merger), in slot order.
    pub embeds: Vec<f32>,
    /// One `[N, H]` DeepStack feature per tap, added after decoder layers 0, 1, ...
    pub deepstack: Vec<Vec<f32>>,
    /// Image tokens N.
    pub tokens: usize,
    /// The patch grid (t, h, w) the tower ran on.
    pub grid_thw: [usize; 3],
    /// Width H of each row.
    pub hidden: usize,
}

impl ImageFeatures {
    /// The merged grid (h', w').
    pub fn merged_grid(&self, merge: usize) -> (usize, usize) {
        (self.grid_thw[1] / merge, self.grid_thw[2] / merge)
    }
}

/// The tower's resident part: config and the small f32 tensors.
pub struct VisionModel {
    cfg: VisionConfig,
    pos_table: Vec<f32>,
}

/// Elements per parallel task of the element-wise passes.
const ELEMS_PER_TASK: usize = 1 << 14;

/// Query rows per attention block: one block's scores (`QUERY_BLOCK × P`) stay in L2.
const QUERY_BLOCK: usize = 96;

impl VisionModel {
    /// Loads the position table and checks every weight's shape and dtype.
    pub fn load(b: &Bundle) -> Result<VisionModel> {
        let cfg = b.config().vision.clone();
        let g = cfg.pos_grid();
        let pos_table = vector(b, &visual("pos_embed.weight"), g * g * cfg.hidden_size)?;
        let m = VisionModel { cfg, pos_table };
        m.check(b)?;
        Ok(m)
    }

    fn check(&self, b: &Bundle) -> Result<()> {
        let c = &self.cfg;
        let (d, i, mdim) = (c.hidden_size, c.intermediate_size, c.merged_dim());
        f16_tensor(
            b,
            &visual("patch_embed.proj.weight"),
            &[
                d,
                c.in_channels,
                c.temporal_patch_size,
                c.patch_size,
                c.patch_size,
            ],
        )?;
        for j in 0..c.depth {
            for (leaf, o, k) in [
                ("attn.qkv", 3 * d, d),
                ("attn.proj", d, d),
                ("mlp.linear_fc1", i, d),
                ("mlp.linear_fc2", d, i),
            ] {
                f16_tensor(b, &vision_block(j, &format!("{leaf}.weight")), &[o, k])?;
                vector(b, &vision_block(j, &format!("{leaf}.bias")), o)?;
            }
        }
        let mut mergers = vec![format!("{}.merger", q3vl_model::layout::VISUAL)];
        for k in 0..c.deepstack_visual_indexes.len() {
            mergers.push(deepstack(k, "").trim_end_matches('.').to_string());
        }
        for p in mergers {
            f16_tensor(b, &format!("{p}.linear_fc1.weight"), &[mdim, mdim])?;
            f16_tensor(
                b,
                &format!("{p}.linear_fc2.weight"),
                &[c.out_hidden_size, mdim],
            )?;
        }
        Ok(())
    }

    /// The vision config.
    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// `x · Wᵀ + b` for an f16 weight `[n, k]` (widened tile by tile inside the GEMM).
    fn lin(
        &self,
        b: &Bundle,
        prefix: &str,
        x: &[f32],
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<Vec<f32>> {
        let w = f16_tensor(b, &format!("{prefix}.weight"), &[n, k])?;
        let bias = vector(b, &format!("{prefix}.bias"), n)?;
        Ok(linear_f16_vec(x, m, k, w, n, Some(&bias)))
    }

    fn layer_norm(&self, b: &Bundle, prefix: &str, x: &[f32], n: usize) -> Result<Vec<f32>> {
        let w = vector(b, &format!("{prefix}.weight"), n)?;
        let bias = vector(b, &format!("{prefix}.bias"), n)?;
        let mut out = vec![0f32; x.len()];
        x.par_chunks(n)
            .zip(out.par_chunks_mut(n))
            .for_each(|(xr, or)| {
                let mean = xr.iter().sum::<f32>() / n as f32;
                let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n as f32;
                let r = 1.0 / (var + LN_EPS).sqrt();
                for (((o, &v), &g), &bb) in or.iter_mut().zip(xr).zip(&w).zip(&bias) {
                    *o = (v - mean) * r * g + bb;
                }
            });
        Ok(out)
    }

    /// A patch merger; `prefix` is e.g. `model.visual.merger`.
    fn merger(&self, b: &Bundle, prefix: &str, x: &[f32], postshuffle: bool) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let md = c.merged_dim();
        let rows = x.len() / md;
        let y = if postshuffle {
            self.layer_norm(b, &format!("{prefix}.norm"), x, md)?
        } else {
            self.layer_norm(b, &format!("{prefix}.norm"), x, c.hidden_size)?
        };
        let mut y = self.lin(b, &format!("{prefix}.linear_fc1"), &y, rows, md, md)?;
        y.par_chunks_mut(ELEMS_PER_TASK).for_each(|c| {
            for v in c {
                *v = gelu_erf(*v);
            }
        });
        self.lin(
            b,
            &format!("{prefix}.linear_fc2"),
            &y,
            rows,
            md,
            c.out_hidden_size,
        )
    }

    /// Runs the tower on `[P, patch_dim]` patch rows of grid `(t, h, w)`.
    pub fn encode(
        &self,
        b: &Bundle,
        pixel_values: &[f32],
        grid_thw: [usize; 3],
    ) -> Result<ImageFeatures> {
        let c = &self.cfg;
        let (d, pd, merge) = (c.hidden_size, c.patch_dim(), c.spatial_merge_size);
        let p: usize = grid_thw.iter().product();
        if grid_thw[0] != 1 {
            return Err(EngineError::Input(format!(
                "grid {grid_thw:?}: only still images (t = 1) are supported"
            )));
        }
        if !grid_thw[1].is_multiple_of(merge) || !grid_thw[2].is_multiple_of(merge) || p == 0 {
            return Err(EngineError::Input(format!(
                "grid {grid_thw:?} is not a positive multiple of the merge size {merge}"
            )));
        }
        if pixel_values.len() != p * pd {
            return Err(EngineError::Input(format!(
                "pixel_values has {} values, grid {grid_thw:?} needs {p}×{pd}",
                pixel_values.len()
            )));
        }
        let mut x = self.lin(b, &visual("patch_embed.proj"), pixel_values, p, pd, d)?;
        let g = c.pos_grid();
        let pe = interpolate_pos_embed(&self.pos_table, g, d, grid_thw, merge);
        for (a, v) in x.iter_mut().zip(&pe) {
            *a += v;
        }
        let (heads, hd) = (c.num_heads, c.head_dim());
        let (cos, sin) = vision_rope(grid_thw, merge, hd, c.rope_theta);
        let mut ds: Vec<(usize, Vec<f32>)> = Vec::new();
        for j in 0..c.depth {
            let h = self.layer_norm(b, &vision_block(j, "norm1"), &x, d)?;
            let qkv = self.lin(b, &vision_block(j, "attn.qkv"), &h, p, d, 3 * d)?;
            let a = vision_attention(&qkv, p, heads, hd, &cos, &sin);
            let o = self.lin(b, &vision_block(j, "attn.proj"), &a, p, d, d)?;
            for (xv, ov) in x.iter_mut().zip(&o) {
                *xv += ov;
            }
            let h = self.layer_norm(b, &vision_block(j, "norm2"), &x, d)?;
            let mut h = self.lin(
                b,
                &vision_block(j, "mlp.linear_fc1"),
                &h,
                p,
                d,
                c.intermediate_size,
            )?;
            h.par_chunks_mut(ELEMS_PER_TASK).for_each(vmath::gelu_tanh);
            let o = self.lin(
                b,
                &vision_block(j, "mlp.linear_fc2"),
                &h,
                p,
                c.intermediate_size,
                d,
            )?;
            for (xv, ov) in x.iter_mut().zip(&o) {
                *xv += ov;
            }
            if let Some(k) = c.deepstack_visual_indexes.iter().position(|&i| i == j) {
                let prefix = deepstack(k, "");
                ds.push((k, self.merger(b, prefix.trim_end_matches('.'), &x, true)?));
            }
        }
        ds.sort_by_key(|(k, _)| *k);
        let embeds = self.merger(b, &visual("merger"), &x, false)?;
        Ok(ImageFeatures {
            embeds,
            deepstack: ds.into_iter().map(|(_, f)| f).collect(),
            tokens: p / (merge * merge),
            grid_thw,
            hidden: c.out_hidden_size,
        })
    }
}

/// The ViT's cos/sin `[P, hd/2]` (the second half repeats the first).
fn vision_rope(grid_thw: [usize; 3], merge: usize, hd: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    let inv = inv_freq(hd / 2, theta);
    let coords = vision_patch_coords(grid_thw, merge);
    let half = hd / 2;
    let mut cos = Vec::with_capacity(coords.len() * half);
    let mut sin = Vec::with_capacity(coords.len() * half);
    for (r, c) in coords {
        for a in inv
            .iter()
            .map(|f| r as f32 * f)
            .chain(inv.iter().map(|f| c as f32 * f))
        {
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    (cos, sin)
}

/// Full (non-causal) attention of one image: RoPE on q and k, `softmax(q kᵀ / √hd) v`.
/// First, per head in parallel, the queries are rotated, K packed and V packed
/// (transposed) once;
/// then every (head, block of [`QUERY_BLOCK`] queries) is its own task, so a thread
/// holds one block's scores at a time and the two cores stay balanced (16 heads
/// alone split unevenly whenever one core runs slower).
fn vision_attention(
    qkv: &[f32],
    p: usize,
    heads: usize,
    hd: usize,
    cos: &[f32],
    sin: &[f32],
) -> Vec<f32> {
    let d = heads * hd;
    let half = hd / 2;
    let scale = (hd as f32).powf(-0.5);
    let prepared: Vec<(Vec<f32>, PackedB, PackedA)> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let mut q = vec![0f32; p * hd];
            let mut k = vec![0f32; p * hd];
            for i in 0..p {
                let row = &qkv[i * 3 * d..(i + 1) * 3 * d];
                q[i * hd..(i + 1) * hd].copy_from_slice(&row[h * hd..(h + 1) * hd]);
                k[i * hd..(i + 1) * hd].copy_from_slice(&row[d + h * hd..d + (h + 1) * hd]);
                let (c, s) = (
                    &cos[i * half..(i + 1) * half],
                    &sin[i * half..(i + 1) * half],
                );
                crate::decoder::rope(&mut q[i * hd..(i + 1) * hd], c, s);
                crate::decoder::rope(&mut k[i * hd..(i + 1) * hd], c, s);
            }
            // B[j, kk] = k[j, kk] for the scores.
            let kp = PackedB::new(
                BSrc::F32 {
                    data: &k,
                    rs: hd,
                    cs: 1,
                },
                p,
                hd,
            );
            // A = vᵀ for the output product (see below), packed once for all query
            // blocks straight from V's columns of `qkv`.
            let vt = PackedA::from_transposed(&qkv[2 * d + h * hd..], hd, p, 3 * d);
            (q, kp, vt)
        })
        .collect();
    let qblocks = p.div_ceil(QUERY_BLOCK);
    let blocks: Vec<Vec<f32>> = (0..heads * qblocks)
        .into_par_iter()
        .map_init(
            || vec![0f32; QUERY_BLOCK.min(p) * p],
            |scores, t| {
                let (q, kp, vt) = &prepared[t / qblocks];
                let q0 = (t % qblocks) * QUERY_BLOCK;
                let qb = QUERY_BLOCK.min(p - q0);
                let s = &mut scores[..qb * p];
                gemm_serial_packed(&q[q0 * hd..], qb, hd, kp, s, p);
                for row in s.chunks_exact_mut(p) {
                    vmath::softmax_row(row, scale);
                }
                // The output transposed, oᵀ = vᵀ · sᵀ (`[hd][qb]`): for hd = 72 its
                // tiles are all full (72 = 12 × 6 rows, 96 = 6 × 16 columns), where
                // o = s · v would leave the last 16-column panel half empty. Each
                // element is the same fused chain over the keys either way (a · b =
                // b · a exactly).
                let mut ot = vec![0f32; hd * qb];
                gemm_serial_packed_a(
                    vt,
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
            },
        )
        .collect();
    // Back to `[P, heads·hd]`, in parallel over query rows: token i of head h is
    // column i − q0 of its block's oᵀ.
    let mut out = vec![0f32; p * d];
    out.par_chunks_mut(d).enumerate().for_each(|(i, row)| {
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

/// Exact (erf) GELU, the mergers' activation.
fn gelu_erf(x: f32) -> f32 {
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
        let cos: Vec<f32> = (0..p * half).map(|i| (i as f32 * 0.01).cos()).collect();
        let sin: Vec<f32> = (0..p * half).map(|i| (i as f32 * 0.01).sin()).collect();
        let got = vision_attention(&qkv, p, heads, hd, &cos, &sin);
        for h in 0..heads {
            let rot = |off: usize, i: usize| {
                let mut v = qkv[i * 3 * d + off + h * hd..i * 3 * d + off + (h + 1) * hd].to_vec();
                crate::decoder::rope(
                    &mut v,
                    &cos[i * half..(i + 1) * half],
                    &sin[i * half..(i + 1) * half],
                );
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
