//! `image.pixels`: our preprocessing of the trace's image against the oracle's
//! `pixel_values`.

use crate::compare::{flat, max_abs_diff};
use crate::error::{Result, VerifyError};
use crate::gates::GateResult;
use crate::trace::OracleTrace;
use q3vl_model::image::{self, Resize};
use q3vl_model::PreprocessorConfig;

/// Our preprocessing of the trace's image against its `pixel_values`: max |diff| and
/// whether `smart_resize` changed the size (None for a text trace).
pub fn pixel_check(
    preprocessor: &PreprocessorConfig,
    trace: &OracleTrace,
) -> Result<Option<(f64, bool)>> {
    let Some(path) = trace.image_path() else {
        return Ok(None);
    };
    if !path.exists() {
        return Err(VerifyError::Trace {
            path: trace.path.clone(),
            msg: format!("its image {} does not exist", path.display()),
        });
    }
    let rgb = image::load_rgb(&path)?;
    let ours = image::preprocess(&rgb, preprocessor, Resize::Dynamic)?;
    let theirs = trace.float("pixel_values")?;
    let resized = ours.grid_thw[1] * preprocessor.patch_size != rgb.height
        || ours.grid_thw[2] * preprocessor.patch_size != rgb.width;
    if theirs.dims() != [ours.num_patches(), ours.patch_dim] {
        return Ok(Some((f64::INFINITY, resized)));
    }
    let (t, _) = flat(theirs)?;
    let m = max_abs_diff(&ours.pixel_values, &t);
    Ok(Some((m, resized)))
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
