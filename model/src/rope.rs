//! Rotary position embeddings: the text decoder's interleaved M-RoPE over (t, h, w)
//! positions and the ViT's 2D (row, col) RoPE (`docs/qwen3-vl-reference.md`
//! §3.3, §4).
//! Angles and their cos/sin are f32, as in HF.

use crate::config::TextConfig;
use candle_core::{Device, Result, Tensor, D};

/// `1 / base^(2i/dim)` for i < dim/2, computed in f32 as torch does.
pub fn inv_freq(dim: usize, base: f64) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| 1.0f32 / (base as f32).powf((2 * i) as f32 / dim as f32))
        .collect()
}

/// Which position axis (0 = t, 1 = h, 2 = w) drives frequency slot `j` of the
/// interleaved layout `THW THW … TTTT`.
pub fn mrope_axis(j: usize, section: [usize; 3]) -> usize {
    if j % 3 == 1 && j < 3 * section[1] {
        1
    } else if j % 3 == 2 && j < 3 * section[2] {
        2
    } else {
        0
    }
}

/// cos and sin tables `[T, head_dim]` for tokens at M-RoPE positions `pos` (t, h, w).
pub fn mrope_cos_sin(pos: &[[i64; 3]], cfg: &TextConfig) -> Result<(Tensor, Tensor)> {
    let inv = inv_freq(cfg.head_dim, cfg.rope_theta);
    let half = inv.len();
    let axis: Vec<usize> = (0..half)
        .map(|j| mrope_axis(j, cfg.mrope_section))
        .collect();
    let mut cos = Vec::with_capacity(pos.len() * half * 2);
    let mut sin = Vec::with_capacity(pos.len() * half * 2);
    for p in pos {
        let ang: Vec<f32> = (0..half).map(|j| p[axis[j]] as f32 * inv[j]).collect();
        for _ in 0..2 {
            cos.extend(ang.iter().map(|a| a.cos()));
            sin.extend(ang.iter().map(|a| a.sin()));
        }
    }
    let shape = (pos.len(), half * 2);
    Ok((
        Tensor::from_vec(cos, shape, &Device::Cpu)?,
        Tensor::from_vec(sin, shape, &Device::Cpu)?,
    ))
}

/// The (row, col) of each patch of a `(t, h, w)` grid, in merge-block order.
pub fn vision_patch_coords(grid_thw: [usize; 3], merge: usize) -> Vec<(usize, usize)> {
    let [t, h, w] = grid_thw;
    let mut out = Vec::with_capacity(t * h * w);
    for _ in 0..t {
        for br in 0..h / merge {
            for bc in 0..w / merge {
                for ir in 0..merge {
                    for ic in 0..merge {
                        out.push((br * merge + ir, bc * merge + ic));
                    }
                }
            }
        }
    }
    out
}

/// The ViT's cos/sin tables `[P, head_dim]`: `[row·inv, col·inv]` repeated twice.
pub fn vision_cos_sin(
    grid_thw: [usize; 3],
    merge: usize,
    head_dim: usize,
    theta: f64,
) -> Result<(Tensor, Tensor)> {
    let inv = inv_freq(head_dim / 2, theta);
    let coords = vision_patch_coords(grid_thw, merge);
    let mut cos = Vec::with_capacity(coords.len() * head_dim);
    let mut sin = Vec::with_capacity(coords.len() * head_dim);
    for (r, c) in &coords {
        let ang: Vec<f32> = inv
            .iter()
            .map(|f| *r as f32 * f)
            .chain(inv.iter().map(|f| *c as f32 * f))
            .collect();
        for _ in 0..2 {
            cos.extend(ang.iter().map(|a| a.cos()));
            sin.extend(ang.iter().map(|a| a.sin()));
        }
    }
    let shape = (coords.len(), head_dim);
    Ok((
        Tensor::from_vec(cos, shape, &Device::Cpu)?,
        Tensor::from_vec(sin, shape, &Device::Cpu)?,
    ))
}

/// `cat(-x[d/2:], x[:d/2])` on the last dimension.
pub fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// `x·cos + rotate_half(x)·sin` with `x: [heads, T, d]` and `cos, sin: [T, d]`.
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(cos)?
        .add(&rotate_half(x)?.broadcast_mul(sin)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_layout_of_the_real_sections() {
        let s = [24, 20, 20];
        let axes: Vec<usize> = (0..64).map(|j| mrope_axis(j, s)).collect();
        assert_eq!(axes.iter().filter(|&&a| a == 0).count(), 24);
        assert_eq!(axes.iter().filter(|&&a| a == 1).count(), 20);
        assert_eq!(axes.iter().filter(|&&a| a == 2).count(), 20);
        assert_eq!(&axes[..6], &[0, 1, 2, 0, 1, 2]);
        assert_eq!(&axes[60..], &[0, 0, 0, 0]);
    }

    #[test]
    fn equal_axes_reduce_to_plain_rope() {
        let cfg = crate::config::Qwen3VlConfig::preset(crate::config::Size::B2).text;
        let (c, s) = mrope_cos_sin(&[[7, 7, 7]], &cfg).unwrap();
        let inv = inv_freq(128, 5e6);
        let c = c.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let s = s.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for j in 0..64 {
            assert_eq!(c[j], (7.0 * inv[j]).cos());
            assert_eq!(c[j + 64], c[j]);
            assert_eq!(s[j], (7.0 * inv[j]).sin());
        }
    }

    #[test]
    fn vision_coords_are_block_major() {
        let c = vision_patch_coords([1, 2, 4], 2);
        assert_eq!(
            c,
            vec![
                (0, 0),
                (0, 1),
                (1, 0),
                (1, 1),
                (0, 2),
                (0, 3),
                (1, 2),
                (1, 3)
            ]
        );
    }
}
