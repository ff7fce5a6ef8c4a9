//! The local gates (bundle profile): each part of the model run on the oracle's own
//! input, so its error is its own and not the sum of everything upstream —
//! `text.local` (every decoder layer), `norm.local` (the final norm) and `head.local`
//! (the LM head).

use crate::compare::{cosine, diff, flat, relative_error};
use crate::error::Result;
use crate::gates::GateResult;
use crate::ladder::Limits;
use crate::noise::NoiseBudget;
use crate::stats::median;
use crate::trace::OracleTrace;
use candle_core::Tensor;
use q3vl_model::{taps, Qwen3VlConfig, WeightSource};
use serde::Serialize;
use std::collections::BTreeMap;

/// One decoder layer run on the oracle's own input: its error alone.
#[derive(Debug, Clone, Serialize)]
pub struct LocalRow {
    /// The layer.
    pub layer: usize,
    /// `|ours − oracle| / |oracle output − oracle input|`, over the flattened update.
    pub update_rel: f64,
    /// Cosine of the two updates.
    pub update_cos: f64,
    /// Whether it is within `local_update_rel`.
    pub passed: bool,
}

/// Each layer's replayed update (`ours`' local taps) against the oracle's, given the
/// oracle's layer `inputs`.
pub fn local_rows(
    trace: &OracleTrace,
    ours: &BTreeMap<String, Tensor>,
    inputs: &[Tensor],
    limit: f64,
) -> Result<Vec<LocalRow>> {
    let mut rows = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        let name = taps::text_layer_local(i);
        let Some(local) = ours.get(&name) else {
            return Err(trace.mismatch(format!("the reference produced no {name}")));
        };
        let (x, _) = flat(input)?;
        let (o, _) = flat(trace.float(&taps::text_layer(i))?)?;
        let (u, _) = flat(local)?;
        let (du, dor) = (diff(&u, &x), diff(&o, &x));
        let update_rel = relative_error(&du, &dor);
        rows.push(LocalRow {
            layer: i,
            update_rel,
            update_cos: cosine(&du, &dor),
            passed: update_rel <= limit,
        });
    }
    Ok(rows)
}

/// `text.local`: every layer's own error, on the oracle's input.
pub fn local_gate(rows: &[LocalRow], limits: &Limits<'_>) -> Option<GateResult> {
    let (mode, m) = limits.mode?;
    let worst = rows
        .iter()
        .max_by(|a, b| a.update_rel.total_cmp(&b.update_rel))?;
    let failed: Vec<String> = rows
        .iter()
        .filter(|r| !r.passed)
        .map(|r| r.layer.to_string())
        .collect();
    Some(GateResult::new(
        "text.local",
        failed.is_empty() && !worst.update_rel.is_nan(),
        format!("{:.5}", worst.update_rel),
        format!(
            "each layer on the oracle's input: update error ≤ {} of it ({mode})",
            m.local_update_rel
        ),
        match failed.first() {
            Some(f) => format!(
                "first failing layer {f} ({} failing): update error {:.4}",
                failed.len(),
                rows[f.parse::<usize>().unwrap_or(0)].update_rel
            ),
            None => format!(
                "{} layers; worst layer {} (update error {:.5}, update cos {:.7})",
                rows.len(),
                worst.layer,
                worst.update_rel,
                worst.update_cos
            ),
        },
    ))
}

/// Our final norm (weights from `src`) on the oracle's last hidden state `x` (with its
/// DeepStack addition when the last layer has one): its relative error against the
/// oracle's `text.norm`.
pub fn norm_error(
    cfg: &Qwen3VlConfig,
    src: &dyn WeightSource,
    trace: &OracleTrace,
    x: &Tensor,
) -> Result<f64> {
    let w = src.tensor(
        &format!("{}.norm.weight", q3vl_model::layout::TEXT),
        &[cfg.text.hidden_size],
    )?;
    let ours = q3vl_model::ops::rms_norm(x, &w, cfg.text.rms_norm_eps)?;
    let (u, _) = flat(&ours)?;
    let (o, _) = flat(trace.float(taps::TEXT_NORM)?)?;
    Ok(relative_error(&u, &o))
}

/// `norm.local`: the final norm's relative error ([`norm_error`]) within `limit`.
pub fn norm_gate(rel: f64, limit: f64) -> GateResult {
    GateResult::new(
        "norm.local",
        rel <= limit,
        format!("{rel:.3e}"),
        format!("relative error ≤ {limit:e}"),
        "the bundle's final norm on the oracle's own last hidden state against the oracle's text.norm",
    )
}

/// `head.local`: the head on the oracle's normed state has its rounding noise only.
pub fn head_gate(b: &NoiseBudget, factor: f64) -> GateResult {
    let measured = median(&b.head_measured);
    let allowed = factor * median(&b.head_var).sqrt();
    GateResult::new(
        "head.local",
        measured <= allowed,
        format!("{measured:.5}"),
        format!("σ ≤ {allowed:.5} (the head's rounding × {factor})"),
        "the bundle's head on the oracle's own text.norm against the oracle's logits (median RMS on the top-k, common shift removed)",
    )
}
