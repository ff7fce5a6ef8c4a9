//! `image.pixels`: our preprocessing of the trace's images against the oracle's
//! `pixel_values`.

use crate::compare::{flat, max_abs_diff};
use crate::error::{Result, VerifyError};
use crate::gates::GateResult;
use crate::trace::OracleTrace;
use q3vl_model::image::{self, Resize};
use q3vl_model::PreprocessorConfig;

/// Our preprocessing of the trace's images against its `pixel_values`: the largest
/// max |diff| and whether `smart_resize` changed any image's size (None for a text
/// trace).
pub fn pixel_check(
    preprocessor: &PreprocessorConfig,
    trace: &OracleTrace,
) -> Result<Option<(f64, bool)>> {
    let paths = trace.image_paths();
    if paths.is_empty() {
        return Ok(None);
    }
    let theirs = trace.images()?;
    if theirs.len() != paths.len() {
        return Err(VerifyError::Trace {
            path: trace.path.clone(),
            msg: format!(
                "its metadata names {} image(s), its image_grid_thw holds {}",
                paths.len(),
                theirs.len()
            ),
        });
    }
    let (mut worst, mut any_resized) = (0f64, false);
    for (path, (pv, _)) in paths.iter().zip(&theirs) {
        if !path.exists() {
            return Err(VerifyError::Trace {
                path: trace.path.clone(),
                msg: format!("its image {} does not exist", path.display()),
            });
        }
        let rgb = image::load_rgb(path)?;
        let ours = image::preprocess(&rgb, preprocessor, Resize::Dynamic)?;
        any_resized |= ours.grid_thw[1] * preprocessor.patch_size != rgb.height
            || ours.grid_thw[2] * preprocessor.patch_size != rgb.width;
        let m = if pv.dims() != [ours.num_patches(), ours.patch_dim] {
            f64::INFINITY
        } else {
            max_abs_diff(&ours.pixel_values, &flat(pv)?.0)
        };
        worst = worst.max(m);
    }
    Ok(Some((worst, any_resized)))
}

/// After a resize the pixel difference is a reported figure (TraceReport::pixels),
/// not a gate: without one, rescale + normalise + patchify must match.
pub fn pixel_gate(pixels: Option<(f64, bool)>, limit: f64) -> Option<GateResult> {
    let (m, false) = pixels? else {
        return None;
    };
    Some(GateResult::new(
        "image.pixels",
        m <= limit,
        format!("{m:.3e}"),
        format!("≤ {limit:e}"),
        "no resize: rescale + normalise + patchify must match",
    ))
}
