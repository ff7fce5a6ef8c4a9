//! The vision tower, fp32 (`docs/qwen3-vl-reference.md` §3): patch embed, interpolated learned
//! position embedding, 2D RoPE, pre-norm ViT blocks, DeepStack mergers and the main merger.

use crate::config::VisionConfig;
use crate::error::{Error, Result};
use crate::layout::{deepstack, vision_block, visual};
use crate::ops::{attention, layer_norm, linear};
use crate::rope;
use crate::source::WeightSource;
use crate::taps::{self, Taps};
use candle_core::{Device, Tensor};

/// LayerNorm epsilon of every vision norm.
const LN_EPS: f64 = 1e-6;

/// What the tower hands the decoder.
#[derive(Debug, Clone)]
pub struct VisionOutput {
    /// Main merger output `[N, Do]`: the image token embeddings.
    pub embeds: Tensor,
    /// One `[N, Do]` feature per DeepStack tap, in tap order.
    pub deepstack: Vec<Tensor>,
}

/// Bilinear (align-corners) resampling of the G×G learned table to an h×w grid,
/// returned `[P, Dv]` in merge-block order (HF `get_vision_interpolation_indices_and_weights`).
pub fn interpolate_pos_embed(
    table: &[f32],
    g: usize,
    dim: usize,
    grid_thw: [usize; 3],
    merge: usize,
) -> Vec<f32> {
    // One axis: taps (floor, floor+1 clamped) and weights (1−d, d), in f32.
    let axis = |i: usize, size: usize| -> ([usize; 2], [f32; 2]) {
        let src = (i as f32 * (g - 1) as f32) / (size.saturating_sub(1).max(1)) as f32;
        let f = src.floor();
        let d = src - f;
        let f0 = (f as usize).min(g - 1);
        let f1 = (f as usize + 1).min(g - 1);
        (
            [f0, f1],
            [(1.0 - d).max(0.0), (1.0 - (d - 1.0).abs()).max(0.0)],
        )
    };
    let coords = rope::vision_patch_coords(grid_thw, merge);
    let mut out = Vec::with_capacity(coords.len() * dim);
    for (r, c) in coords {
        let (hi, hw) = axis(r, grid_thw[1]);
        let (wi, ww) = axis(c, grid_thw[2]);
        let taps = [
            (hi[0] * g + wi[0], hw[0] * ww[0]),
            (hi[0] * g + wi[1], hw[0] * ww[1]),
            (hi[1] * g + wi[0], hw[1] * ww[0]),
            (hi[1] * g + wi[1], hw[1] * ww[1]),
        ];
        for d in 0..dim {
            let mut acc = 0f32;
            for (idx, w) in taps {
                acc += table[idx * dim + d] * w;
            }
            out.push(acc);
        }
    }
    out
}

fn ln(
    src: &dyn WeightSource,
    x: &Tensor,
    prefix: &dyn Fn(&str) -> String,
    n: usize,
) -> Result<Tensor> {
    let w = src.tensor(&prefix("weight"), &[n])?;
    let b = src.tensor(&prefix("bias"), &[n])?;
    Ok(layer_norm(x, &w, &b, LN_EPS)?)
}

fn lin(src: &dyn WeightSource, x: &Tensor, prefix: &str, out: usize, inp: usize) -> Result<Tensor> {
    let w = src.tensor(&format!("{prefix}.weight"), &[out, inp])?;
    let b = src.tensor(&format!("{prefix}.bias"), &[out])?;
    Ok(linear(x, &w, Some(&b))?)
}

/// A patch merger: 2×2 patches → one token. The main merger norms each patch
/// (`postshuffle = false`), the DeepStack mergers norm the concatenation.
fn merger(
    src: &dyn WeightSource,
    cfg: &VisionConfig,
    x: &Tensor,
    name: &dyn Fn(&str) -> String,
    postshuffle: bool,
) -> Result<Tensor> {
    let m = cfg.merged_dim();
    let p = x.dim(0)?;
    let y = if postshuffle {
        ln(
            src,
            &x.reshape((p / 4, m))?,
            &|l| name(&format!("norm.{l}")),
            m,
        )?
    } else {
        ln(src, x, &|l| name(&format!("norm.{l}")), cfg.hidden_size)?.reshape((p / 4, m))?
    };
    let y = lin(src, &y, &name("linear_fc1"), m, m)?.gelu_erf()?;
    lin(src, &y, &name("linear_fc2"), cfg.out_hidden_size, m)
}

/// ViT block `j`: `x + proj(attn(LN1 x))`, then `+ fc2(gelu_tanh(fc1(LN2 x)))`.
fn block(
    src: &dyn WeightSource,
    cfg: &VisionConfig,
    j: usize,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let (d, heads, hd) = (cfg.hidden_size, cfg.num_heads, cfg.head_dim());
    let p = x.dim(0)?;
    let h = ln(src, x, &|l| vision_block(j, &format!("norm1.{l}")), d)?;
    // qkv features are [q | k | v], each head-major.
    let qkv = lin(src, &h, &vision_block(j, "attn.qkv"), 3 * d, d)?.reshape((p, 3, heads, hd))?;
    let part = |i: usize| -> candle_core::Result<Tensor> {
        qkv.narrow(1, i, 1)?
            .squeeze(1)?
            .transpose(0, 1)?
            .contiguous()
    };
    let (q, k, v) = (part(0)?, part(1)?, part(2)?);
    let q = rope::apply(&q, cos, sin)?;
    let k = rope::apply(&k, cos, sin)?;
    let a = attention(&q, &k, &v, (hd as f64).powf(-0.5), None)?
        .transpose(0, 1)?
        .reshape((p, d))?;
    let x = (x + lin(src, &a, &vision_block(j, "attn.proj"), d, d)?)?;
    let h = ln(src, &x, &|l| vision_block(j, &format!("norm2.{l}")), d)?;
    let h = lin(
        src,
        &h,
        &vision_block(j, "mlp.linear_fc1"),
        cfg.intermediate_size,
        d,
    )?
    .gelu()?;
    let h = lin(
        src,
        &h,
        &vision_block(j, "mlp.linear_fc2"),
        d,
        cfg.intermediate_size,
    )?;
    Ok((x + h)?)
}

/// Runs the tower on one image's patch rows `[P, C·T·p·p]` with grid `(t, h, w)`.
pub fn forward(
    cfg: &VisionConfig,
    src: &dyn WeightSource,
    pixel_values: &Tensor,
    grid_thw: [usize; 3],
    taps: &mut Taps,
) -> Result<VisionOutput> {
    let (d, pd) = (cfg.hidden_size, cfg.patch_dim());
    let m = cfg.spatial_merge_size;
    let p: usize = grid_thw.iter().product();
    if pixel_values.dims() != [p, pd] {
        return Err(Error::Config(format!(
            "pixel_values is {:?}, but grid {grid_thw:?} needs [{p}, {pd}]",
            pixel_values.dims()
        )));
    }
    if !grid_thw[1].is_multiple_of(m) || !grid_thw[2].is_multiple_of(m) {
        return Err(Error::Config(format!(
            "grid {grid_thw:?} is not a multiple of the merge size {m}"
        )));
    }
    // Patch embed: the Conv3d is one matmul over the flattened (c, t, py, px) patch.
    let w = src
        .tensor(
            &visual("patch_embed.proj.weight"),
            &[
                d,
                cfg.in_channels,
                cfg.temporal_patch_size,
                cfg.patch_size,
                cfg.patch_size,
            ],
        )?
        .reshape((d, pd))?;
    let b = src.tensor(&visual("patch_embed.proj.bias"), &[d])?;
    let x = linear(pixel_values, &w, Some(&b))?;
    let g = cfg.pos_grid();
    let table = src
        .tensor(&visual("pos_embed.weight"), &[g * g, d])?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let pe = interpolate_pos_embed(&table, g, d, grid_thw, m);
    let mut x = (x + Tensor::from_vec(pe, (p, d), &Device::Cpu)?)?;
    taps.put(taps::VISION_EMBED, &x);
    let (cos, sin) = rope::vision_cos_sin(grid_thw, m, cfg.head_dim(), cfg.rope_theta)?;
    let mut ds = Vec::new();
    for j in 0..cfg.depth {
        x = block(src, cfg, j, &x, &cos, &sin)?;
        taps.put(taps::vision_block(j), &x);
        if let Some(k) = cfg.deepstack_visual_indexes.iter().position(|&i| i == j) {
            let f = merger(src, cfg, &x, &|l| deepstack(k, l), true)?;
            ds.push((k, f));
        }
    }
    // Taps are recorded in tap order even if the config lists indexes unsorted.
    ds.sort_by_key(|(k, _)| *k);
    let deepstack: Vec<Tensor> = ds.into_iter().map(|(_, f)| f).collect();
    for (k, f) in deepstack.iter().enumerate() {
        taps.put(taps::vision_deepstack(k), f);
    }
    let embeds = merger(src, cfg, &x, &|l| visual(&format!("merger.{l}")), false)?;
    taps.put(taps::VISION_MERGER, &embeds);
    Ok(VisionOutput { embeds, deepstack })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At the grid corners the interpolation returns the table's corners exactly.
    #[test]
    fn pos_embed_corners_are_exact() {
        let g = 4;
        let table: Vec<f32> = (0..g * g).map(|i| i as f32).collect();
        let pe = interpolate_pos_embed(&table, g, 1, [1, 6, 8], 2);
        // Merge-block order: the first patch is (0, 0), the last is (5, 7).
        assert_eq!(pe[0], 0.0);
        assert_eq!(*pe.last().unwrap(), 15.0);
        // Row-linear table: value = 4·row + col, bilinear reproduces it.
        let coords = rope::vision_patch_coords([1, 6, 8], 2);
        for ((r, c), v) in coords.iter().zip(&pe) {
            let want = 4.0 * (*r as f32 * 3.0 / 5.0) + *c as f32 * 3.0 / 7.0;
            assert!((v - want).abs() < 1e-5, "{r},{c}: {v} vs {want}");
        }
    }
}
