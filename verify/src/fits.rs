//! Whether a trace fits the model it is compared with: every tap has exactly the
//! shape the model gives it, before any comparison runs.

use crate::error::Result;
use crate::trace::OracleTrace;
use q3vl_model::{taps, Qwen3VlConfig};

/// Refuses a trace whose shapes do not fit the model (a trace of another model, or a
/// damaged one): every tap must have exactly the shape the model gives it, or a
/// comparison would silently cover fewer rows than it claims.
pub fn check_fits(cfg: &Qwen3VlConfig, trace: &OracleTrace) -> Result<()> {
    let ids = trace.int("input_ids")?.1;
    let t = ids.len();
    if t == 0 {
        return Err(trace.mismatch("input_ids is empty: there is no prompt to verify".into()));
    }
    let h = cfg.text.hidden_size;
    let shape = |name: &str, want: [usize; 2]| -> Result<()> {
        let d = trace.float(name)?.dims().to_vec();
        match d == want {
            true => Ok(()),
            false => Err(trace.mismatch(format!(
                "{name} is {d:?}, the model and the prompt need {want:?}"
            ))),
        }
    };
    shape(taps::TEXT_EMBED, [t, h])?;
    shape(taps::TEXT_NORM, [t, h])?;
    for i in 0..cfg.text.num_hidden_layers {
        shape(&taps::text_layer(i), [t, h])?;
    }
    let extra = taps::text_layer(cfg.text.num_hidden_layers);
    if trace.float_opt(&extra).is_some() {
        return Err(trace.mismatch(format!(
            "the trace has more than the model's {} decoder layers",
            cfg.text.num_hidden_layers
        )));
    }
    let v = cfg.text.vocab_size as i64;
    if let Some(bad) = ids.iter().find(|&&x| x < 0 || x >= v) {
        return Err(trace.mismatch(format!("input id {bad} is outside the vocabulary ({v})")));
    }
    for group in ["logits", "decode"] {
        if trace.int(&format!("{group}.top_ids")).is_err() && group == "decode" {
            continue;
        }
        let (top, _) = trace.top_k(group)?;
        if let Some(bad) = top.iter().flatten().find(|&&x| x < 0 || x >= v) {
            return Err(trace.mismatch(format!(
                "{group}.top_ids holds {bad}, outside the vocabulary ({v})"
            )));
        }
    }
    let grids = trace.grids()?;
    if !grids.is_empty() {
        check_vision_fits(cfg, trace, &grids, &shape)?;
    }
    Ok(())
}

/// The vision taps of an image trace (every image's rows, one after another),
/// against the model's vision tower.
fn check_vision_fits(
    cfg: &Qwen3VlConfig,
    trace: &OracleTrace,
    grids: &[[usize; 3]],
    shape: &dyn Fn(&str, [usize; 2]) -> Result<()>,
) -> Result<()> {
    let vc = &cfg.vision;
    let merge = vc.spatial_merge_size * vc.spatial_merge_size;
    for grid in grids {
        let p: usize = grid.iter().product();
        if p == 0 || !p.is_multiple_of(merge) {
            return Err(trace.mismatch(format!(
                "image_grid_thw {grid:?} is not a whole number of merged patches"
            )));
        }
    }
    let p: usize = grids.iter().map(|g| g.iter().product::<usize>()).sum();
    shape("pixel_values", [p, vc.patch_dim()])?;
    shape(taps::VISION_EMBED, [p, vc.hidden_size])?;
    for j in 0..vc.depth {
        shape(&taps::vision_block(j), [p, vc.hidden_size])?;
    }
    if trace.float_opt(&taps::vision_block(vc.depth)).is_some() {
        return Err(trace.mismatch(format!("the trace has more than {} ViT blocks", vc.depth)));
    }
    let n = p / merge;
    shape(taps::VISION_MERGER, [n, vc.out_hidden_size])?;
    for k in 0..vc.deepstack_visual_indexes.len() {
        shape(&taps::vision_deepstack(k), [n, vc.out_hidden_size])?;
    }
    let img = q3vl_model::text::image_rows(&trace.input_ids()?, cfg.image_token_id).len();
    if img != n {
        return Err(trace.mismatch(format!(
            "the prompt has {img} image tokens, the grids {grids:?} give {n}"
        )));
    }
    Ok(())
}
