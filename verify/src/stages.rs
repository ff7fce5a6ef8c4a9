//! The stage-by-stage comparison: every tap of the reference run against the
//! oracle's, one row each, and the ladder gates (`vision.ladder`, `text.ladder`) over
//! the rows a profile gates.

use crate::compare::{agreement, diff, flat, Agreement};
use crate::error::Result;
use crate::gates::GateResult;
use crate::ladder::{Limits, Profile};
use crate::layer_inputs::layer_inputs;
use crate::trace::OracleTrace;
use candle_core::Tensor;
use q3vl_model::{taps, Qwen3VlConfig};
use serde::Serialize;
use std::collections::BTreeMap;

/// Which part of the model a compared stage belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// The vision tower and its mergers.
    Vision,
    /// The decoder.
    Text,
    /// The prompt logits.
    Logits,
}

/// One compared stage.
#[derive(Debug, Clone, Serialize)]
pub struct StageRow {
    /// Which part of the model.
    pub stage: Stage,
    /// The trace tensor's name.
    pub name: String,
    /// Block or layer index, when the stage has one.
    pub index: Option<usize>,
    /// Cosine of the flattened tensors.
    pub cos: f64,
    /// Smallest per-token cosine.
    pub min_token_cos: f64,
    /// Where it is.
    pub min_token_pos: usize,
    /// Largest |ours − oracle|.
    pub max_abs: f64,
    /// Cosine of this block's / layer's update (output − input).
    pub update_cos: Option<f64>,
    /// Whether a gate reads this row.
    pub gated: bool,
    /// Whether the row is within its gate (true when not gated).
    pub passed: bool,
}

impl StageRow {
    /// A row of `stage`; `gate` is None when no gate reads it, else whether it passed.
    fn new(
        stage: Stage,
        name: String,
        index: Option<usize>,
        a: Agreement,
        update_cos: Option<f64>,
        gate: Option<bool>,
    ) -> Self {
        StageRow {
            stage,
            name,
            index,
            cos: a.cos,
            min_token_cos: a.min_token_cos,
            min_token_pos: a.min_token_pos,
            max_abs: a.max_abs,
            update_cos,
            gated: gate.is_some(),
            passed: gate.unwrap_or(true),
        }
    }
}

/// Compares every tap of `ours` with the oracle's and applies the profile's row
/// gates; `oracle_inputs` are the oracle's layer inputs ([`layer_inputs`]).
pub fn stage_rows(
    cfg: &Qwen3VlConfig,
    trace: &OracleTrace,
    ours: &BTreeMap<String, Tensor>,
    oracle_inputs: &[Tensor],
    limits: &Limits<'_>,
) -> Result<Vec<StageRow>> {
    let c = Compare {
        trace,
        ours,
        limits,
    };
    let mut rows = Vec::new();
    if trace.has_image() {
        c.vision(cfg, &mut rows)?;
    }
    c.text(cfg, oracle_inputs, &mut rows)?;
    c.logits(&mut rows)?;
    Ok(rows)
}

/// The two sides of the comparison and the thresholds.
struct Compare<'a> {
    trace: &'a OracleTrace,
    ours: &'a BTreeMap<String, Tensor>,
    limits: &'a Limits<'a>,
}

impl Compare<'_> {
    /// Our tap `name`, flattened, with its row width.
    fn ours(&self, name: &str) -> Result<(Vec<f32>, usize)> {
        flat(self.our_tap(name)?)
    }

    fn our_tap(&self, name: &str) -> Result<&Tensor> {
        self.ours.get(name).ok_or_else(|| {
            self.trace
                .mismatch(format!("the reference produced no {name}"))
        })
    }

    /// The oracle's tensor `name`, flattened.
    fn oracle(&self, name: &str) -> Result<Vec<f32>> {
        Ok(flat(self.trace.float(name)?)?.0)
    }

    /// The fp32 row gate: stage cosine, every token's, and the update's when it has one.
    fn fp32_pass(&self, a: &Agreement, update: Option<f64>) -> bool {
        let fp = &self.limits.gates.fp32;
        a.cos >= fp.stage_cos
            && a.min_token_cos >= fp.token_cos_min
            && update.is_none_or(|u| u >= fp.update_cos)
    }

    /// Gated under the fp32 profile only.
    fn fp32_only(&self, a: &Agreement) -> Option<bool> {
        (self.limits.profile == Profile::Fp32).then(|| self.fp32_pass(a, None))
    }

    /// The ViT's patch embedding and blocks (fp32 gates them), then the merger and the
    /// DeepStack mergers (every profile gates them).
    fn vision(&self, cfg: &Qwen3VlConfig, rows: &mut Vec<StageRow>) -> Result<()> {
        let fp32 = self.limits.profile == Profile::Fp32;
        let mut prev_o = self.oracle(taps::VISION_EMBED)?;
        let (mut prev_u, w) = self.ours(taps::VISION_EMBED)?;
        let a = agreement(&prev_u, &prev_o, w);
        let embed = taps::VISION_EMBED.into();
        rows.push(StageRow::new(
            Stage::Vision,
            embed,
            None,
            a,
            None,
            self.fp32_only(&a),
        ));
        for j in 0..cfg.vision.depth {
            let n = taps::vision_block(j);
            let o = self.oracle(&n)?;
            let (u, w) = self.ours(&n)?;
            let a = agreement(&u, &o, w);
            let up = agreement(&diff(&u, &prev_u), &diff(&o, &prev_o), w).cos;
            let gate = fp32.then(|| self.fp32_pass(&a, Some(up)));
            rows.push(StageRow::new(Stage::Vision, n, Some(j), a, Some(up), gate));
            (prev_o, prev_u) = (o, u);
        }
        let mut heads = vec![taps::VISION_MERGER.to_string()];
        heads.extend((0..cfg.vision.deepstack_visual_indexes.len()).map(taps::vision_deepstack));
        for (k, n) in heads.into_iter().enumerate() {
            let o = self.oracle(&n)?;
            let (u, w) = self.ours(&n)?;
            let a = agreement(&u, &o, w);
            let pass = match self.limits.vision {
                None => self.fp32_pass(&a, None),
                Some((_, m)) => a.cos >= m.vision_cos,
            };
            let idx = k.checked_sub(1);
            rows.push(StageRow::new(Stage::Vision, n, idx, a, None, Some(pass)));
        }
        Ok(())
    }

    /// The embeddings and the final norm (fp32 gates them) and every decoder layer
    /// (every profile gates them). Layer i's update is its output minus its input,
    /// each side's own ([`layer_inputs`]).
    fn text(
        &self,
        cfg: &Qwen3VlConfig,
        oracle_inputs: &[Tensor],
        rows: &mut Vec<StageRow>,
    ) -> Result<()> {
        let o = self.oracle(taps::TEXT_EMBED)?;
        let (u, w) = self.ours(taps::TEXT_EMBED)?;
        let a = agreement(&u, &o, w);
        let embed = taps::TEXT_EMBED.into();
        rows.push(StageRow::new(
            Stage::Text,
            embed,
            None,
            a,
            None,
            self.fp32_only(&a),
        ));
        let ids = self.trace.input_ids()?;
        let our_inputs = layer_inputs(cfg, &ids, self.trace.has_image(), |n| self.our_tap(n))?;
        for i in 0..cfg.text.num_hidden_layers {
            let n = taps::text_layer(i);
            let o = self.oracle(&n)?;
            let (u, w) = self.ours(&n)?;
            let a = agreement(&u, &o, w);
            let (in_o, _) = flat(&oracle_inputs[i])?;
            let (in_u, _) = flat(&our_inputs[i])?;
            let up = agreement(&diff(&u, &in_u), &diff(&o, &in_o), w).cos;
            let pass = match self.limits.mode {
                None => self.fp32_pass(&a, Some(up)),
                Some((_, m)) => a.cos >= m.layer_cos(i),
            };
            rows.push(StageRow::new(
                Stage::Text,
                n,
                Some(i),
                a,
                Some(up),
                Some(pass),
            ));
        }
        let o = self.oracle(taps::TEXT_NORM)?;
        let (u, w) = self.ours(taps::TEXT_NORM)?;
        let a = agreement(&u, &o, w);
        let norm = taps::TEXT_NORM.into();
        rows.push(StageRow::new(
            Stage::Text,
            norm,
            None,
            a,
            None,
            self.fp32_only(&a),
        ));
        Ok(())
    }

    /// The prompt logits, reported (never gated) when the trace kept them whole.
    fn logits(&self, rows: &mut Vec<StageRow>) -> Result<()> {
        if let Some(l) = self.trace.float_opt(taps::LOGITS) {
            let (o, _) = flat(l)?;
            let (u, w) = self.ours(taps::LOGITS)?;
            if o.len() == u.len() {
                let a = agreement(&u, &o, w);
                let name = taps::LOGITS.into();
                rows.push(StageRow::new(Stage::Logits, name, None, a, None, None));
            }
        }
        Ok(())
    }
}

/// The gate of one ladder (`vision.ladder` or `text.ladder`) over its gated rows;
/// None when the stage has none (a text prompt has no vision rows).
pub fn ladder_gate(rows: &[StageRow], stage: Stage, limits: &Limits<'_>) -> Option<GateResult> {
    let gate = match stage {
        Stage::Vision => "vision.ladder",
        Stage::Text => "text.ladder",
        Stage::Logits => return None,
    };
    let gated: Vec<&StageRow> = rows
        .iter()
        .filter(|r| r.stage == stage && r.gated)
        .collect();
    let worst = gated.iter().min_by(|a, b| a.cos.total_cmp(&b.cos))?;
    let failed: Vec<&str> = gated
        .iter()
        .filter(|r| !r.passed)
        .map(|r| r.name.as_str())
        .collect();
    let detail = match failed.first() {
        None => format!(
            "{} stages; worst {} (cos {:.7})",
            gated.len(),
            worst.name,
            worst.cos
        ),
        Some(f) => format!("first failing stage {f} ({} failing)", failed.len()),
    };
    Some(GateResult::new(
        gate,
        failed.is_empty(),
        format!("{:.7}", worst.cos),
        ladder_threshold(stage, gated.len(), limits),
        detail,
    ))
}

/// What a ladder's rows are held to, as the report says it.
fn ladder_threshold(stage: Stage, gated: usize, limits: &Limits<'_>) -> String {
    let fp = &limits.gates.fp32;
    match (limits.mode, limits.vision, stage) {
        (None, _, _) => format!(
            "cos ≥ {}, token cos ≥ {}, update cos ≥ {}",
            fp.stage_cos, fp.token_cos_min, fp.update_cos
        ),
        (Some(_), Some((mode, m)), Stage::Vision) => {
            format!("merger/DeepStack cos ≥ {} ({mode})", m.vision_cos)
        }
        (Some((mode, m)), _, _) => format!(
            "layer i: cos ≥ 1 − (i+1)·{} ({mode}; {:.5} at the last)",
            m.layer_gap,
            m.layer_cos(gated.saturating_sub(1))
        ),
    }
}
