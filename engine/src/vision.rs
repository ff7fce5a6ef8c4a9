//! The vision tower on f16 weights with f32 arithmetic (`docs/qwen3-vl-reference.md`
//! §3): patch embed, interpolated position embedding, 2D RoPE ViT blocks, DeepStack
//! mergers and the main merger. Every linear runs all patches at once through the packed
//! GEMM ([`crate::kernels::gemm::linear_f16_vec`]), which widens each f16 weight tile
//! to f32 while packing it, so no f32 copy of the tower is kept. Read it beside
//! `model/src/vision.rs`, the fp32 reference, whose names it uses (`embed`, `block`,
//! `merger`, `ln`, `lin`); the attention is in `vision_attention.rs`.

use crate::error::{EngineError, Result};
use crate::kernels::gemm::linear_f16_vec;
use crate::kernels::vmath;
use crate::ops::{add_in_place, gelu_erf, layer_norm_rows, RopeTable, ELEMS_PER_TASK};
use crate::vision_attention::vision_attention;
use crate::weights::{f16_tensor, vector};
use q3vl_bundle::Bundle;
use q3vl_model::config::VisionConfig;
use q3vl_model::layout::{deepstack, vision_block, visual};
use q3vl_model::rope::{inv_freq, vision_patch_coords};
use q3vl_model::vision::interpolate_pos_embed;
use rayon::prelude::*;

/// LayerNorm epsilon of every vision norm.
const LN_EPS: f32 = 1e-6;

/// One image through the tower: what the decoder takes, computed once per image (the
/// reference decoder's `ImageFeatures`, as flat f32 rows).
#[derive(Debug, Clone)]
pub struct EncodedImage {
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

impl EncodedImage {
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

    /// Runs the tower on one image's patch rows `[P, patch_dim]` with grid `(t, h, w)`.
    pub fn encode(
        &self,
        b: &Bundle,
        pixel_values: &[f32],
        grid_thw: [usize; 3],
    ) -> Result<EncodedImage> {
        let c = &self.cfg;
        let merge = c.spatial_merge_size;
        let p = self.check_grid(pixel_values, grid_thw)?;
        let mut x = self.embed(b, pixel_values, p, grid_thw)?;
        let rope = vision_cos_sin(grid_thw, merge, c.head_dim(), c.rope_theta);
        let mut ds: Vec<(usize, Vec<f32>)> = Vec::new();
        for j in 0..c.depth {
            self.block(b, j, &mut x, &rope)?;
            if let Some(k) = c.deepstack_visual_indexes.iter().position(|&i| i == j) {
                let prefix = deepstack(k, "");
                ds.push((k, self.merger(b, prefix.trim_end_matches('.'), &x, true)?));
            }
        }
        // Features in tap order even if the config lists indexes unsorted.
        ds.sort_by_key(|(k, _)| *k);
        let embeds = self.merger(b, &visual("merger"), &x, false)?;
        Ok(EncodedImage {
            embeds,
            deepstack: ds.into_iter().map(|(_, f)| f).collect(),
            tokens: p / (merge * merge),
            grid_thw,
            hidden: c.out_hidden_size,
        })
    }

    /// Checks a still image's grid and its pixel rows; returns the patches P.
    fn check_grid(&self, pixel_values: &[f32], grid: [usize; 3]) -> Result<usize> {
        let (pd, merge) = (self.cfg.patch_dim(), self.cfg.spatial_merge_size);
        let p: usize = grid.iter().product();
        let mergeable = grid[1].is_multiple_of(merge) && grid[2].is_multiple_of(merge);
        if grid[0] != 1 || !mergeable || p == 0 {
            return Err(EngineError::ImageGrid { grid, merge });
        }
        if pixel_values.len() != p * pd {
            return Err(EngineError::PixelCount {
                found: pixel_values.len(),
                grid,
                patches: p,
                patch_dim: pd,
            });
        }
        Ok(p)
    }

    /// Patch embed (the Conv3d as one matmul over the flattened patch) plus the
    /// interpolated position embedding: `[P, D]`.
    fn embed(
        &self,
        b: &Bundle,
        pixel_values: &[f32],
        p: usize,
        grid_thw: [usize; 3],
    ) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let d = c.hidden_size;
        let mut x = self.lin(
            b,
            &visual("patch_embed.proj"),
            pixel_values,
            p,
            c.patch_dim(),
            d,
        )?;
        let pe = interpolate_pos_embed(
            &self.pos_table,
            c.pos_grid(),
            d,
            grid_thw,
            c.spatial_merge_size,
        );
        add_in_place(&mut x, &pe);
        Ok(x)
    }

    /// ViT block `j`: `x += proj(attn(LN1 x))`, then `x += fc2(gelu_tanh(fc1(LN2 x)))`.
    fn block(&self, b: &Bundle, j: usize, x: &mut [f32], rope: &RopeTable) -> Result<()> {
        let c = &self.cfg;
        let (d, heads, hd, inter) = (
            c.hidden_size,
            c.num_heads,
            c.head_dim(),
            c.intermediate_size,
        );
        let p = x.len() / d;
        let h = self.ln(b, &vision_block(j, "norm1"), x, d)?;
        let qkv = self.lin(b, &vision_block(j, "attn.qkv"), &h, p, d, 3 * d)?;
        let a = vision_attention(&qkv, p, heads, hd, rope);
        let o = self.lin(b, &vision_block(j, "attn.proj"), &a, p, d, d)?;
        add_in_place(x, &o);
        let h = self.ln(b, &vision_block(j, "norm2"), x, d)?;
        let mut h = self.lin(b, &vision_block(j, "mlp.linear_fc1"), &h, p, d, inter)?;
        h.par_chunks_mut(ELEMS_PER_TASK).for_each(vmath::gelu_tanh);
        let o = self.lin(b, &vision_block(j, "mlp.linear_fc2"), &h, p, inter, d)?;
        add_in_place(x, &o);
        Ok(())
    }

    /// A patch merger, 2×2 patches → one token; `prefix` is e.g. `model.visual.merger`.
    /// The main merger norms each patch (`postshuffle = false`), the DeepStack mergers
    /// norm the concatenation.
    fn merger(&self, b: &Bundle, prefix: &str, x: &[f32], postshuffle: bool) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let md = c.merged_dim();
        let rows = x.len() / md;
        let norm_width = if postshuffle { md } else { c.hidden_size };
        let y = self.ln(b, &format!("{prefix}.norm"), x, norm_width)?;
        let mut y = self.lin(b, &format!("{prefix}.linear_fc1"), &y, rows, md, md)?;
        y.par_chunks_mut(ELEMS_PER_TASK).for_each(|c| {
            for v in c {
                *v = gelu_erf(*v);
            }
        });
        let fc2 = format!("{prefix}.linear_fc2");
        self.lin(b, &fc2, &y, rows, md, c.out_hidden_size)
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

    /// LayerNorm `prefix` over each `n`-wide row of `x`.
    fn ln(&self, b: &Bundle, prefix: &str, x: &[f32], n: usize) -> Result<Vec<f32>> {
        let w = vector(b, &format!("{prefix}.weight"), n)?;
        let bias = vector(b, &format!("{prefix}.bias"), n)?;
        Ok(layer_norm_rows(x, &w, &bias, LN_EPS))
    }
}

/// The ViT's rotations: cos/sin `[P, hd/2]` of each patch's (row, column) angles (the
/// second half of a head repeats the first).
fn vision_cos_sin(grid_thw: [usize; 3], merge: usize, hd: usize, theta: f64) -> RopeTable {
    let inv = inv_freq(hd / 2, theta);
    let inv = &inv;
    let angles = vision_patch_coords(grid_thw, merge)
        .into_iter()
        .flat_map(|(r, c)| {
            let (r, c) = (r as f32, c as f32);
            inv.iter()
                .map(move |f| r * f)
                .chain(inv.iter().map(move |f| c * f))
        });
    RopeTable::from_angles(angles, hd / 2)
}
