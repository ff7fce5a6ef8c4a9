//! The preprocessing record of a vision bundle: the host's normalization settings and
//! the fixed 448×448 grid the tower is exported for.

use crate::error::{ConvertError, Result};
use q3vl_bundle::{FixedGrid, Preprocessing};
use q3vl_model::{PreprocessorConfig, Qwen3VlConfig};
use std::path::Path;

/// Side of the fixed image grid, in pixels.
pub const FIXED_SIDE: usize = 448;

/// The preprocessing record for `cfg` and the source's `preprocessor_config.json`
/// (defaults when absent). Patch and merge sizes come from the model config; a
/// preprocessor that disagrees is an error naming the file.
pub fn preprocessing(src: &Path, cfg: &Qwen3VlConfig) -> Result<Preprocessing> {
    let pre = PreprocessorConfig::from_dir(src)?;
    let v = &cfg.vision;
    let file = src.join("preprocessor_config.json");
    if pre.patch_size != v.patch_size
        || pre.merge_size != v.spatial_merge_size
        || pre.temporal_patch_size != v.temporal_patch_size
    {
        return Err(ConvertError::input(
            file,
            format!(
                "patch/merge/temporal sizes {}/{}/{} differ from config.json's {}/{}/{}",
                pre.patch_size,
                pre.merge_size,
                pre.temporal_patch_size,
                v.patch_size,
                v.spatial_merge_size,
                v.temporal_patch_size
            ),
        ));
    }
    let unit = v.patch_size * v.spatial_merge_size;
    if unit == 0 || !FIXED_SIDE.is_multiple_of(unit) {
        return Err(ConvertError::input(
            src.join("config.json"),
            format!(
                "the fixed {FIXED_SIDE}px grid is not a whole number of {unit}px merged patches"
            ),
        ));
    }
    let side = FIXED_SIDE / v.patch_size;
    let merged = side / v.spatial_merge_size;
    Ok(Preprocessing {
        image_mean: pre.image_mean,
        image_std: pre.image_std,
        rescale_factor: pre.rescale_factor,
        patch_size: v.patch_size,
        temporal_patch_size: v.temporal_patch_size,
        merge_size: v.spatial_merge_size,
        min_pixels: pre.min_pixels,
        max_pixels: pre.max_pixels,
        fixed_grid: FixedGrid {
            height: FIXED_SIDE,
            width: FIXED_SIDE,
            grid_thw: [1, side, side],
            patches: side * side,
            patch_dim: v.patch_dim(),
            tokens: merged * merged,
        },
        deepstack_visual_indexes: v.deepstack_visual_indexes.clone(),
        out_hidden_size: v.out_hidden_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_real_grid_gives_196_tokens() {
        let d = tempfile::tempdir().unwrap();
        let cfg = Qwen3VlConfig::preset(q3vl_model::Size::B8);
        let p = preprocessing(d.path(), &cfg).unwrap();
        assert_eq!(p.fixed_grid.tokens, 196);
        assert_eq!(p.fixed_grid.patches, 784);
        assert_eq!(p.fixed_grid.patch_dim, 1536);
        assert_eq!(p.deepstack_visual_indexes, vec![8, 16, 24]);
    }
}
