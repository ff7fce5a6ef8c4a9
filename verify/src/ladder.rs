//! The ladder: the reference run on one trace's inputs, compared stage by stage with
//! what the oracle recorded, then turned into gates. The same code serves the fp32
//! ladder (original checkpoint) and the quantized ladder (a bundle's weights).

use crate::compare::{agreement, diff, flat, relative_error, Agreement};
use crate::engine_gate::{run_engine, EngineDecode, EngineMatch};
use crate::error::{Result, VerifyError};
use crate::gates::{GateResult, Gates, ModeGates};
use crate::noise::{self, NoiseBudget, RoundingVariance};
use crate::stats::{LogitStats, PositionStat};
use crate::token_gates;
use crate::tokens::{DecodeMatch, Top1Sweep};
use crate::trace::OracleTrace;
use candle_core::Tensor;
use q3vl_engine::Engine;
use q3vl_model::image::{self, Resize};
use q3vl_model::prompt::{Prompt, PromptBuilder};
use q3vl_model::reference::{self, Continuation, ImageInput};
use q3vl_model::{taps, PreprocessorConfig, Qwen3VlConfig, WeightSource};
use serde::Serialize;
use std::collections::BTreeMap;
use std::f64::consts::SQRT_2;
use std::path::PathBuf;

/// Which thresholds apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// The fp32 reference on the original checkpoint: tight, every stage gated.
    Fp32,
    /// The reference on a bundle's dequantized weights: the quantized gates.
    Bundle,
}

/// What is being verified.
pub struct Subject<'a> {
    /// The model's configuration.
    pub cfg: &'a Qwen3VlConfig,
    /// Its weights.
    pub src: &'a dyn WeightSource,
    /// Its tokenizer and chat template, to rebuild the prompt ids.
    pub prompt: &'a PromptBuilder,
    /// Its image preprocessing, to rebuild the pixel values.
    pub preprocessor: &'a PreprocessorConfig,
    /// Keep decoder layers resident (small models) or stream them (large ones).
    pub keep_weights: bool,
    /// The engine on the same bundles, for the engine ≡ reference gate (bundle
    /// profile only; None skips the gate).
    pub engine: Option<&'a Engine>,
    /// The bundle's conversion mode (`int8hu`, `int8lin`, `fp16`): which thresholds
    /// apply (bundle profile).
    pub mode: Option<&'a str>,
    /// The bundle's rounding, for the noise allowance (bundle profile; None: no
    /// `logits.noise` gate can be computed, and it fails saying so).
    pub rounding: Option<&'a dyn RoundingVariance>,
}

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

/// Everything one trace's verification found.
#[derive(Debug, Clone, Serialize)]
pub struct TraceReport {
    /// The trace file.
    pub trace: PathBuf,
    /// Its sha256.
    pub trace_sha256: String,
    /// The model the oracle ran.
    pub model: String,
    /// Who computed the trace (`transformers`, or `q3vl-reference` for models made
    /// at test time).
    pub oracle: String,
    /// The user prompt.
    pub prompt: String,
    /// The image file, for image traces.
    pub image: Option<String>,
    /// Thresholds used.
    pub profile: Profile,
    /// The bundle mode whose thresholds applied (bundle profile).
    pub mode: Option<String>,
    /// Prompt length.
    pub tokens: usize,
    /// Stage-by-stage comparison.
    pub rows: Vec<StageRow>,
    /// Each decoder layer replayed on the oracle's own input (bundle profile).
    pub local: Vec<LocalRow>,
    /// Max |pixel difference| of our preprocessing, and whether a resize happened.
    pub pixels: Option<(f64, bool)>,
    /// The margin a position needed to count as firm here: the gates file's
    /// `firm_margin`, or more where the measured noise needs it.
    pub firm_margin: f64,
    /// Statistics over every scored position (prompt, then the HF-seeded decode).
    pub stats: LogitStats,
    /// Each scored position's figures, in the same order.
    pub positions: Vec<PositionStat>,
    /// The noise the bundle's quantization allows (bundle profile).
    pub noise_budget: Option<NoiseBudget>,
    /// Teacher-forced prompt sweep.
    pub sweep: Top1Sweep,
    /// Free-running greedy decode.
    pub decode: DecodeMatch,
    /// Our greedy tokens.
    pub decode_tokens: Vec<u32>,
    /// The oracle's.
    pub oracle_tokens: Vec<u32>,
    /// Oracle top-1 margin of each decode step.
    pub decode_margins: Vec<f64>,
    /// HF-seeded decode (bundle profile).
    pub seeded: Option<Top1Sweep>,
    /// Engine ≡ reference (bundle profile, when an engine ran).
    pub engine: Option<EngineMatch>,
    /// Gates, in order.
    pub gates: Vec<GateResult>,
}

impl TraceReport {
    /// Whether every gate passed.
    pub fn passed(&self) -> bool {
        self.gates.iter().all(|g| g.passed)
    }
}

fn mismatch(trace: &OracleTrace, msg: String) -> VerifyError {
    VerifyError::Mismatch {
        path: trace.path.clone(),
        msg,
    }
}

/// Refuses a trace whose shapes do not fit the model (a trace of another model, or a
/// damaged one): every tap must have exactly the shape the model gives it, or a
/// comparison would silently cover fewer rows than it claims.
pub fn check_fits(cfg: &Qwen3VlConfig, trace: &OracleTrace) -> Result<()> {
    let ids = trace.int("input_ids")?.1;
    let t = ids.len();
    if t == 0 {
        return Err(mismatch(
            trace,
            "input_ids is empty: there is no prompt to verify".into(),
        ));
    }
    let h = cfg.text.hidden_size;
    let shape = |name: &str, want: [usize; 2]| -> Result<()> {
        let d = trace.float(name)?.dims().to_vec();
        match d == want {
            true => Ok(()),
            false => Err(mismatch(
                trace,
                format!("{name} is {d:?}, the model and the prompt need {want:?}"),
            )),
        }
    };
    shape(taps::TEXT_EMBED, [t, h])?;
    shape(taps::TEXT_NORM, [t, h])?;
    for i in 0..cfg.text.num_hidden_layers {
        shape(&taps::text_layer(i), [t, h])?;
    }
    let extra = taps::text_layer(cfg.text.num_hidden_layers);
    if trace.float_opt(&extra).is_some() {
        return Err(mismatch(
            trace,
            format!(
                "the trace has more than the model's {} decoder layers",
                cfg.text.num_hidden_layers
            ),
        ));
    }
    let v = cfg.text.vocab_size as i64;
    if let Some(bad) = ids.iter().find(|&&x| x < 0 || x >= v) {
        return Err(mismatch(
            trace,
            format!("input id {bad} is outside the vocabulary ({v})"),
        ));
    }
    for group in ["logits", "decode"] {
        if trace.int(&format!("{group}.top_ids")).is_err() && group == "decode" {
            continue;
        }
        let (top, _) = trace.top_k(group)?;
        if let Some(bad) = top.iter().flatten().find(|&&x| x < 0 || x >= v) {
            return Err(mismatch(
                trace,
                format!("{group}.top_ids holds {bad}, outside the vocabulary ({v})"),
            ));
        }
    }
    if let Some(grid) = trace.grid_thw()? {
        check_vision_fits(cfg, trace, grid, &shape)?;
    }
    Ok(())
}

/// The vision taps of an image trace, against the model's vision tower.
fn check_vision_fits(
    cfg: &Qwen3VlConfig,
    trace: &OracleTrace,
    grid: [usize; 3],
    shape: &dyn Fn(&str, [usize; 2]) -> Result<()>,
) -> Result<()> {
    let vc = &cfg.vision;
    let p: usize = grid.iter().product();
    let merge = vc.spatial_merge_size * vc.spatial_merge_size;
    if p == 0 || !p.is_multiple_of(merge) {
        return Err(mismatch(
            trace,
            format!("image_grid_thw {grid:?} is not a whole number of merged patches"),
        ));
    }
    shape("pixel_values", [p, vc.patch_dim()])?;
    shape(taps::VISION_EMBED, [p, vc.hidden_size])?;
    for j in 0..vc.depth {
        shape(&taps::vision_block(j), [p, vc.hidden_size])?;
    }
    if trace.float_opt(&taps::vision_block(vc.depth)).is_some() {
        return Err(mismatch(
            trace,
            format!("the trace has more than {} ViT blocks", vc.depth),
        ));
    }
    let n = p / merge;
    shape(taps::VISION_MERGER, [n, vc.out_hidden_size])?;
    for k in 0..vc.deepstack_visual_indexes.len() {
        shape(&taps::vision_deepstack(k), [n, vc.out_hidden_size])?;
    }
    let img = q3vl_model::text::image_rows(&trace.input_ids()?, cfg.image_token_id).len();
    if img != n {
        return Err(mismatch(
            trace,
            format!("the prompt has {img} image tokens, the grid {grid:?} gives {n}"),
        ));
    }
    Ok(())
}

/// Our preprocessing of the trace's image against its `pixel_values`: max |diff| and
/// whether `smart_resize` changed the size.
fn pixel_check(subject: &Subject<'_>, trace: &OracleTrace) -> Result<Option<(f64, bool)>> {
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
    let ours = image::preprocess(&rgb, subject.preprocessor, Resize::Dynamic)?;
    let theirs = trace.float("pixel_values")?;
    let resized = ours.grid_thw[1] * subject.preprocessor.patch_size != rgb.height
        || ours.grid_thw[2] * subject.preprocessor.patch_size != rgb.width;
    if theirs.dims() != [ours.num_patches(), ours.patch_dim] {
        return Ok(Some((f64::INFINITY, resized)));
    }
    let (t, _) = flat(theirs)?;
    let m = crate::compare::max_abs_diff(&ours.pixel_values, &t);
    Ok(Some((m, resized)))
}

/// The thresholds that apply to one run: the profile's, and a bundle's mode's.
struct Limits<'g> {
    gates: &'g Gates,
    profile: Profile,
    /// The bundle's mode and its thresholds (bundle profile only).
    mode: Option<(&'g str, &'g ModeGates)>,
}

/// What the two models computed on one trace's inputs.
struct Runs {
    reference: reference::ReferenceRun,
    engine: Option<EngineDecode>,
}

/// Runs the reference on the trace's inputs and compares everything.
pub fn verify_trace(
    subject: &Subject<'_>,
    trace: &OracleTrace,
    gates: &Gates,
    profile: Profile,
) -> Result<TraceReport> {
    let cfg = subject.cfg;
    check_fits(cfg, trace)?;
    let limits = Limits {
        gates,
        profile,
        mode: match profile {
            Profile::Bundle => Some(gates.bundle.mode(subject.mode)?),
            Profile::Fp32 => None,
        },
    };
    let (prompt, ids_gate) = token_gates::prompt_ids(subject.prompt, trace)?;
    let mut results = vec![ids_gate];
    let pixels = pixel_check(subject, trace)?;
    results.extend(pixel_gate(pixels, gates));

    let oracle_tokens = trace.decode_tokens()?;
    // The oracle's own input to each layer and to the final norm, for the local gates
    // (read from the trace once: on the 8B they are 37 × [T, 4096] f32).
    let inputs = match profile {
        Profile::Bundle => oracle_layer_inputs(cfg, trace)?,
        Profile::Fp32 => vec![],
    };
    let (layer_inputs, norm_input) = match inputs.split_last() {
        Some((norm, layers)) => (Some(layers), Some(norm)),
        None => (None, None),
    };
    let runs = run_models(
        subject,
        trace,
        &prompt,
        &oracle_tokens,
        &limits,
        layer_inputs,
    )?;
    let logits = runs
        .reference
        .taps
        .get(taps::LOGITS)
        .expect("reference records logits");
    let rows = stage_rows(cfg, trace, &runs.reference.taps, &limits)?;
    results.extend(ladder_gates(&rows, &limits));

    // Statistics over every scored position: the prompt, then the HF-seeded decode.
    let forced = runs.reference.continuations[0].logits.as_ref();
    let scored = token_gates::Scored::new(trace, logits, forced)?;
    let budget = match (profile, subject.rounding, limits.mode) {
        (Profile::Bundle, Some(r), Some((_, m))) => Some(noise::budget(
            cfg,
            subject.src,
            r,
            trace.float(taps::TEXT_NORM)?,
            (&scored.oracle_prompt_ids, &trace.top_k("logits")?.1),
            m.layer_cos(cfg.text.num_hidden_layers.saturating_sub(1)),
        )?),
        _ => None,
    };
    let local = match (limits.mode, layer_inputs) {
        (Some((_, m)), Some(x)) => local_rows(trace, &runs.reference.taps, x, m.local_update_rel)?,
        _ => vec![],
    };
    results.extend(local_gate(&local, &limits));
    if let Some(x) = norm_input {
        results.push(norm_gate(subject, trace, x, gates.bundle.norm_local_rel)?);
    }
    results.extend(
        budget
            .as_ref()
            .map(|b| head_gate(b, gates.bundle.head_factor)),
    );
    let firm = gates
        .firm_margin
        .max(gates.noise_z * SQRT_2 * scored.stats.noise);
    results.extend(token_gates::statistics(
        &scored,
        budget.as_ref(),
        &limits.gates_for_stats(),
        firm,
    ));

    let sweep = scored.prompt_sweep(firm);
    results.push(token_gates::top1_gate(&sweep, firm, &scored));
    let seeded = (profile == Profile::Bundle).then(|| scored.decode_sweep(firm));
    results.extend(
        seeded
            .as_ref()
            .map(|s| token_gates::seeded_gate(s, firm, &scored)),
    );
    let limit = match profile {
        Profile::Fp32 if gates.fp32.decode_steps > 0 => gates.fp32.decode_steps,
        Profile::Fp32 => oracle_tokens.len(),
        Profile::Bundle => gates.bundle.free_decode_steps,
    };
    let greedy = token_gates::greedy(&scored, &oracle_tokens, firm, limit);
    results.push(greedy.gate(firm, limit));

    let engine = match &runs.engine {
        Some(e) => {
            let m = EngineMatch::new(
                &trace.path,
                e,
                runs.reference.continuations[1].logits.as_ref(),
                logits,
                gates.firm_margin,
            )?;
            results.push(m.gate(gates.firm_margin, gates.bundle.engine_logits_cos));
            Some(m)
        }
        None => None,
    };

    Ok(TraceReport {
        trace: trace.path.clone(),
        trace_sha256: trace.sha256.clone(),
        model: trace.meta("model").to_string(),
        oracle: trace.oracle().to_string(),
        prompt: trace.meta("prompt").to_string(),
        image: trace.image_path().map(|p| p.display().to_string()),
        profile,
        mode: limits.mode.map(|(m, _)| m.to_string()),
        tokens: prompt.ids.len(),
        rows,
        local,
        pixels,
        firm_margin: firm,
        stats: scored.stats.clone(),
        positions: scored.positions.clone(),
        noise_budget: budget,
        sweep,
        decode: greedy.matched,
        decode_tokens: greedy.tokens,
        oracle_tokens,
        decode_margins: scored.decode_margins(),
        seeded,
        engine,
        gates: results,
    })
}

impl Limits<'_> {
    /// What the statistics gates read.
    fn gates_for_stats(&self) -> token_gates::StatLimits {
        match self.profile {
            Profile::Fp32 => token_gates::StatLimits::Fp32 {
                kld_max: self.gates.fp32.kld_max,
            },
            Profile::Bundle => token_gates::StatLimits::Bundle {
                noise_factor: self.gates.bundle.noise_factor,
                kld_factor: self.gates.bundle.kld_factor,
            },
        }
    }
}

/// After a resize the pixel difference is a reported figure (TraceReport::pixels),
/// not a gate: without one, rescale + normalise + patchify must match.
fn pixel_gate(pixels: Option<(f64, bool)>, gates: &Gates) -> Option<GateResult> {
    let (m, false) = pixels? else {
        return None;
    };
    let limit = gates.fp32.pixel_max_abs;
    Some(GateResult::new(
        "image.pixels",
        m <= limit,
        format!("{m:.3e}"),
        format!("≤ {limit:e}"),
        "no resize: rescale + normalise + patchify must match",
    ))
}

/// The reference on the trace's own ids and pixel values, teacher-forced along the
/// oracle's tokens (one pass serves every decode gate: free-running greedy decode
/// equals it up to the first mismatch); with an engine, the engine's greedy decode
/// first and a second forced pass along its tokens (engine ≡ reference).
fn run_models(
    subject: &Subject<'_>,
    trace: &OracleTrace,
    prompt: &Prompt,
    oracle_tokens: &[u32],
    limits: &Limits<'_>,
    replay: Option<&[Tensor]>,
) -> Result<Runs> {
    let mut conts = vec![Continuation::Forced(oracle_tokens.to_vec())];
    let pv = match trace.grid_thw()? {
        Some(g) => Some((trace.float("pixel_values")?.clone(), g)),
        None => None,
    };
    let engine = match (limits.profile, subject.engine) {
        (Profile::Bundle, Some(engine)) => {
            let steps = match limits.gates.bundle.engine_steps {
                0 => oracle_tokens.len(),
                n => n,
            };
            let pixels = match &pv {
                Some((t, g)) => Some((flat(t)?.0, *g)),
                None => None,
            };
            let pixels = pixels.as_ref().map(|(v, g)| (v.as_slice(), *g));
            let run = run_engine(engine, &prompt.ids, pixels, steps)?;
            // The engine read every weight through its own maps; drop them from the
            // resident set before the streamed reference runs, so the two peaks do not add.
            engine.language().release_all();
            engine.vision_bundle().release_all();
            conts.push(Continuation::Forced(run.tokens.clone()));
            Some(run)
        }
        _ => None,
    };
    let image = pv.as_ref().map(|(t, g)| ImageInput {
        pixel_values: t,
        grid_thw: *g,
    });
    let reference = reference::run_replaying(
        subject.cfg,
        subject.src,
        prompt,
        image,
        &conts,
        subject.keep_weights,
        replay,
    )?;
    Ok(Runs { reference, engine })
}

/// The oracle's input to each decoder layer, then to the final norm: `text.embed`
/// for layer 0, then each layer's output plus its DeepStack addition at the image rows.
fn oracle_layer_inputs(cfg: &Qwen3VlConfig, trace: &OracleTrace) -> Result<Vec<Tensor>> {
    let ids = trace.input_ids()?;
    let img_rows = q3vl_model::text::image_rows(&ids, cfg.image_token_id);
    let n_ds = match trace.has_image() {
        true => cfg.vision.deepstack_visual_indexes.len(),
        false => 0,
    };
    let mut inputs = vec![trace.float(taps::TEXT_EMBED)?.clone()];
    for i in 0..cfg.text.num_hidden_layers {
        let mut x = trace.float(&taps::text_layer(i))?.clone();
        if i < n_ds && !img_rows.is_empty() {
            let ds = trace.float(&taps::vision_deepstack(i))?;
            x = q3vl_model::text::add_rows(&x, &img_rows, ds)?;
        }
        inputs.push(x);
    }
    Ok(inputs)
}

/// Each layer's replayed update against the oracle's.
fn local_rows(
    trace: &OracleTrace,
    ours: &BTreeMap<String, Tensor>,
    inputs: &[Tensor],
    limit: f64,
) -> Result<Vec<LocalRow>> {
    let mut rows = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        let name = taps::text_layer_local(i);
        let Some(local) = ours.get(&name) else {
            return Err(mismatch(trace, format!("the reference produced no {name}")));
        };
        let (x, _) = flat(input)?;
        let (o, _) = flat(trace.float(&taps::text_layer(i))?)?;
        let (u, _) = flat(local)?;
        let (du, dor) = (diff(&u, &x), diff(&o, &x));
        let update_rel = relative_error(&du, &dor);
        rows.push(LocalRow {
            layer: i,
            update_rel,
            update_cos: crate::compare::cosine(&du, &dor),
            passed: update_rel <= limit,
        });
    }
    Ok(rows)
}

/// `text.local`: every layer's own error, on the oracle's input.
fn local_gate(rows: &[LocalRow], limits: &Limits<'_>) -> Option<GateResult> {
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

/// `norm.local`: our final norm on the oracle's last hidden state (with its DeepStack
/// addition when the last layer has one) against the oracle's `text.norm`.
fn norm_gate(
    subject: &Subject<'_>,
    trace: &OracleTrace,
    x: &Tensor,
    limit: f64,
) -> Result<GateResult> {
    let cfg = subject.cfg;
    let w = subject.src.tensor(
        &format!("{}.norm.weight", q3vl_model::layout::TEXT),
        &[cfg.text.hidden_size],
    )?;
    let ours = q3vl_model::ops::rms_norm(x, &w, cfg.text.rms_norm_eps)?;
    let (u, _) = flat(&ours)?;
    let (o, _) = flat(trace.float(taps::TEXT_NORM)?)?;
    let rel = relative_error(&u, &o);
    Ok(GateResult::new(
        "norm.local",
        rel <= limit,
        format!("{rel:.3e}"),
        format!("relative error ≤ {limit:e}"),
        "the bundle's final norm on the oracle's own last hidden state against the oracle's text.norm",
    ))
}

/// `head.local`: the head on the oracle's normed state has its rounding noise only.
fn head_gate(b: &NoiseBudget, factor: f64) -> GateResult {
    let measured = crate::stats::median(&b.head_measured);
    let allowed = factor * crate::stats::median(&b.head_var).sqrt();
    GateResult::new(
        "head.local",
        measured <= allowed,
        format!("{measured:.5}"),
        format!("σ ≤ {allowed:.5} (the head's rounding × {factor})"),
        "the bundle's head on the oracle's own text.norm against the oracle's logits (median RMS on the top-k, common shift removed)",
    )
}

/// One gate per ladder (vision, text) over its gated rows.
fn ladder_gates(rows: &[StageRow], limits: &Limits<'_>) -> Vec<GateResult> {
    let mut out = Vec::new();
    for (stage, gate) in [
        (Stage::Vision, "vision.ladder"),
        (Stage::Text, "text.ladder"),
    ] {
        let gated: Vec<&StageRow> = rows
            .iter()
            .filter(|r| r.stage == stage && r.gated)
            .collect();
        let Some(worst) = gated.iter().min_by(|a, b| a.cos.total_cmp(&b.cos)) else {
            continue;
        };
        let failed: Vec<&str> = gated
            .iter()
            .filter(|r| !r.passed)
            .map(|r| r.name.as_str())
            .collect();
        let fp = &limits.gates.fp32;
        let threshold = match (limits.mode, stage) {
            (None, _) => format!(
                "cos ≥ {}, token cos ≥ {}, update cos ≥ {}",
                fp.stage_cos, fp.token_cos_min, fp.update_cos
            ),
            (Some((mode, m)), Stage::Vision) => {
                format!("merger/DeepStack cos ≥ {} ({mode})", m.vision_cos)
            }
            (Some((mode, m)), _) => format!(
                "layer i: cos ≥ 1 − (i+1)·{} ({mode}; {:.5} at the last)",
                m.layer_gap,
                m.layer_cos(gated.len().saturating_sub(1))
            ),
        };
        let detail = match failed.first() {
            None => format!(
                "{} stages; worst {} (cos {:.7})",
                gated.len(),
                worst.name,
                worst.cos
            ),
            Some(f) => format!("first failing stage {f} ({} failing)", failed.len()),
        };
        out.push(GateResult::new(
            gate,
            failed.is_empty(),
            format!("{:.7}", worst.cos),
            threshold,
            detail,
        ));
    }
    out
}

/// Compares every tap with the oracle's and applies the profile's row gates.
fn stage_rows(
    cfg: &Qwen3VlConfig,
    trace: &OracleTrace,
    ours: &BTreeMap<String, Tensor>,
    limits: &Limits<'_>,
) -> Result<Vec<StageRow>> {
    let profile = limits.profile;
    let gates = limits.gates;
    let mut rows = Vec::new();
    let get = |m: &BTreeMap<String, Tensor>, n: &str| -> Result<(Vec<f32>, usize)> {
        flat(
            m.get(n)
                .ok_or_else(|| mismatch(trace, format!("the reference produced no {n}")))?,
        )
    };
    let oracle = |n: &str| -> Result<(Vec<f32>, usize)> { flat(trace.float(n)?) };
    let fp = &gates.fp32;
    let row = |stage: Stage,
               name: String,
               index: Option<usize>,
               a: Agreement,
               update_cos: Option<f64>,
               gated: bool,
               passed: bool| StageRow {
        stage,
        name,
        index,
        cos: a.cos,
        min_token_cos: a.min_token_cos,
        min_token_pos: a.min_token_pos,
        max_abs: a.max_abs,
        update_cos,
        gated,
        passed: !gated || passed,
    };
    let fp32_pass = |a: &Agreement, u: Option<f64>| {
        a.cos >= fp.stage_cos
            && a.min_token_cos >= fp.token_cos_min
            && u.is_none_or(|u| u >= fp.update_cos)
    };

    if trace.has_image() {
        let (mut prev_o, _) = oracle(taps::VISION_EMBED)?;
        let (mut prev_u, w) = get(ours, taps::VISION_EMBED)?;
        let a = agreement(&prev_u, &prev_o, w);
        let g = profile == Profile::Fp32;
        rows.push(row(
            Stage::Vision,
            taps::VISION_EMBED.into(),
            None,
            a,
            None,
            g,
            fp32_pass(&a, None),
        ));
        for j in 0..cfg.vision.depth {
            let n = taps::vision_block(j);
            let (o, _) = oracle(&n)?;
            let (u, w) = get(ours, &n)?;
            let a = agreement(&u, &o, w);
            let up = agreement(&diff(&u, &prev_u), &diff(&o, &prev_o), w).cos;
            rows.push(row(
                Stage::Vision,
                n,
                Some(j),
                a,
                Some(up),
                g,
                fp32_pass(&a, Some(up)),
            ));
            (prev_o, prev_u) = (o, u);
        }
        let mut heads = vec![taps::VISION_MERGER.to_string()];
        heads.extend((0..cfg.vision.deepstack_visual_indexes.len()).map(taps::vision_deepstack));
        for (k, n) in heads.into_iter().enumerate() {
            let (o, _) = oracle(&n)?;
            let (u, w) = get(ours, &n)?;
            let a = agreement(&u, &o, w);
            let pass = match limits.mode {
                None => fp32_pass(&a, None),
                Some((_, m)) => a.cos >= m.vision_cos,
            };
            let idx = if k == 0 { None } else { Some(k - 1) };
            rows.push(row(Stage::Vision, n, idx, a, None, true, pass));
        }
    }

    // Text: layer i's update is its output minus its input, where the input of layers
    // 1..=n_ds carries the previous layer's DeepStack addition at image rows.
    let ids = trace.input_ids()?;
    let img_rows = q3vl_model::text::image_rows(&ids, cfg.image_token_id);
    let h = cfg.text.hidden_size;
    let add_ds = |x: &mut Vec<f32>, ds: &[f32]| {
        for (k, &r) in img_rows.iter().enumerate() {
            for d in 0..h {
                x[r * h + d] += ds[k * h + d];
            }
        }
    };
    let n_ds = if trace.has_image() {
        cfg.vision.deepstack_visual_indexes.len()
    } else {
        0
    };
    let (mut in_o, _) = oracle(taps::TEXT_EMBED)?;
    let (mut in_u, w) = get(ours, taps::TEXT_EMBED)?;
    let a = agreement(&in_u, &in_o, w);
    rows.push(row(
        Stage::Text,
        taps::TEXT_EMBED.into(),
        None,
        a,
        None,
        profile == Profile::Fp32,
        fp32_pass(&a, None),
    ));
    for i in 0..cfg.text.num_hidden_layers {
        let n = taps::text_layer(i);
        let (o, _) = oracle(&n)?;
        let (u, w) = get(ours, &n)?;
        let a = agreement(&u, &o, w);
        let up = agreement(&diff(&u, &in_u), &diff(&o, &in_o), w).cos;
        let pass = match limits.mode {
            None => fp32_pass(&a, Some(up)),
            Some((_, m)) => a.cos >= m.layer_cos(i),
        };
        rows.push(row(Stage::Text, n, Some(i), a, Some(up), true, pass));
        (in_o, in_u) = (o, u);
        if i < n_ds {
            add_ds(&mut in_o, &oracle(&taps::vision_deepstack(i))?.0);
            add_ds(&mut in_u, &get(ours, &taps::vision_deepstack(i))?.0);
        }
    }
    let (o, _) = oracle(taps::TEXT_NORM)?;
    let (u, w) = get(ours, taps::TEXT_NORM)?;
    let a = agreement(&u, &o, w);
    rows.push(row(
        Stage::Text,
        taps::TEXT_NORM.into(),
        None,
        a,
        None,
        profile == Profile::Fp32,
        fp32_pass(&a, None),
    ));
    if let Some(l) = trace.float_opt(taps::LOGITS) {
        let (o, _) = flat(l)?;
        let (u, w) = get(ours, taps::LOGITS)?;
        if o.len() == u.len() {
            rows.push(row(
                Stage::Logits,
                taps::LOGITS.into(),
                None,
                agreement(&u, &o, w),
                None,
                false,
                true,
            ));
        }
    }
    Ok(rows)
}
