//! The ladder: the reference run on one trace's inputs, compared stage by stage with
//! what the oracle recorded, then turned into gates. The same code serves the fp32
//! ladder (original checkpoint) and the quantized ladder (a bundle's weights).
//!
//! [`verify_trace`] measures everything first (the models run once), then reads each
//! gate off the measurements, in the order the report lists them.

use crate::engine_gate::EngineMatch;
use crate::error::Result;
use crate::gates::{GateResult, Gates, ModeGates};
use crate::layer_inputs::layer_inputs;
use crate::local::{head_gate, local_gate, local_rows, norm_error, norm_gate};
use crate::noise::{self, NoiseBudget, RoundingVariance};
use crate::pixels::{pixel_check, pixel_gate};
use crate::runs::run_models;
use crate::stages::{ladder_gate, stage_rows};
use crate::stats::{LogitStats, PositionStat};
use crate::token_gates::{self, Greedy, PromptIds, Scored, StatLimits};
use crate::tokens::{DecodeMatch, Top1Sweep};
use crate::trace::OracleTrace;
use q3vl_engine::Engine;
use q3vl_model::prompt::PromptBuilder;
use q3vl_model::{taps, PreprocessorConfig, Qwen3VlConfig, WeightSource};
use serde::Serialize;
use std::f64::consts::SQRT_2;
use std::path::PathBuf;

pub use crate::fits::check_fits;
pub use crate::local::LocalRow;
pub use crate::stages::{Stage, StageRow};

/// Which thresholds apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// The fp32 reference on the original checkpoint: tight, every stage gated.
    Fp32,
    /// The reference on a bundle's dequantized weights: the quantized gates.
    Bundle,
    /// The reference on a GGUF pair's weights, dequantized as llama.cpp reads them:
    /// the quantized gates, with the thresholds of the file's coarsest tensor type.
    Gguf,
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
    /// The bundle's conversion mode (`int8hu`, `int8lin`, `fp16`), or a GGUF's coarsest
    /// text type: which thresholds apply (bundle and GGUF profiles).
    pub mode: Option<&'a str>,
    /// The thresholds of the vision tower, when its weights are of another type than
    /// the decoder's (a GGUF's projector); None: `mode`'s.
    pub vision_mode: Option<&'a str>,
    /// The bundle's rounding, for the noise allowance (bundle profile; None: no
    /// `logits.noise` gate can be computed, and it fails saying so).
    pub rounding: Option<&'a dyn RoundingVariance>,
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
    /// The thresholds the vision ladder was held to, when not `mode`'s (a GGUF's
    /// projector type).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vision_mode: Option<String>,
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

/// The thresholds that apply to one run: the profile's, and a bundle's mode's.
pub(crate) struct Limits<'g> {
    /// The whole gates file.
    pub gates: &'g Gates,
    /// Which profile's thresholds apply.
    pub profile: Profile,
    /// The bundle's mode and its thresholds (bundle profile only).
    pub mode: Option<(&'g str, &'g ModeGates)>,
    /// The vision tower's (a GGUF projector's own type), else `mode`.
    pub vision: Option<(&'g str, &'g ModeGates)>,
}

impl<'g> Limits<'g> {
    fn new(
        gates: &'g Gates,
        profile: Profile,
        mode: Option<&str>,
        vision_mode: Option<&str>,
    ) -> Result<Self> {
        let (mode, vision) = match profile {
            Profile::Bundle | Profile::Gguf => {
                let m = gates.bundle.mode(mode)?;
                let v = vision_mode
                    .map(|v| gates.bundle.mode(Some(v)))
                    .transpose()?;
                (Some(m), Some(v.unwrap_or(m)))
            }
            Profile::Fp32 => (None, None),
        };
        Ok(Limits {
            gates,
            profile,
            mode,
            vision,
        })
    }

    /// What the statistics gates read.
    fn stat_limits(&self) -> StatLimits {
        match self.profile {
            Profile::Fp32 => StatLimits::Fp32 {
                kld_max: self.gates.fp32.kld_max,
            },
            Profile::Bundle | Profile::Gguf => StatLimits::Bundle {
                noise_factor: self.gates.bundle.noise_factor,
                kld_factor: self.gates.bundle.kld_factor,
            },
        }
    }

    /// Free-running greedy steps `decode.greedy` counts, of `oracle` steps.
    fn greedy_steps(&self, oracle: usize) -> usize {
        match self.profile {
            Profile::Fp32 if self.gates.fp32.decode_steps > 0 => self.gates.fp32.decode_steps,
            Profile::Fp32 => oracle,
            Profile::Bundle | Profile::Gguf => self.gates.bundle.free_decode_steps,
        }
    }
}

/// Runs the reference (and the engine) on the trace's inputs, compares everything,
/// and holds it to the gates, in report order.
pub fn verify_trace(
    subject: &Subject<'_>,
    trace: &OracleTrace,
    gates: &Gates,
    profile: Profile,
) -> Result<TraceReport> {
    check_fits(subject.cfg, trace)?;
    let limits = Limits::new(gates, profile, subject.mode, subject.vision_mode)?;
    let e = measure(subject, trace, &limits)?;
    let (bundle, firm) = (&gates.bundle, e.firm);
    let mut results = vec![e.prompt.gate()];
    results.extend(pixel_gate(e.pixels, gates.fp32.pixel_max_abs));
    results.extend(ladder_gate(&e.rows, Stage::Vision, &limits));
    results.extend(ladder_gate(&e.rows, Stage::Text, &limits));
    results.extend(local_gate(&e.local, &limits));
    results.extend(e.norm_rel.map(|r| norm_gate(r, bundle.norm_local_rel)));
    results.extend(e.budget.as_ref().map(|b| head_gate(b, bundle.head_factor)));
    let stat_limits = limits.stat_limits();
    results.extend(token_gates::statistics(
        &e.scored,
        e.budget.as_ref(),
        &stat_limits,
        firm,
    ));
    results.push(token_gates::top1_gate(&e.sweep, firm, &e.scored));
    results.extend(
        e.seeded
            .as_ref()
            .map(|s| token_gates::seeded_gate(s, firm, &e.scored)),
    );
    results.push(e.greedy.gate(firm, e.greedy_steps));
    results.extend(
        e.engine
            .as_ref()
            .map(|m| m.gate(gates.firm_margin, bundle.engine_logits_cos)),
    );
    Ok(e.into_report(trace, &limits, results))
}

/// Everything measured on one trace, before any gate reads it.
struct Evidence {
    prompt: PromptIds,
    pixels: Option<(f64, bool)>,
    oracle_tokens: Vec<u32>,
    rows: Vec<StageRow>,
    local: Vec<LocalRow>,
    /// `norm.local`'s relative error (bundle profile).
    norm_rel: Option<f64>,
    budget: Option<NoiseBudget>,
    scored: Scored,
    /// The margin a position needs to count as firm here.
    firm: f64,
    sweep: Top1Sweep,
    seeded: Option<Top1Sweep>,
    greedy: Greedy,
    greedy_steps: usize,
    engine: Option<EngineMatch>,
}

/// Runs the models on the trace's inputs and measures everything the gates read.
fn measure(subject: &Subject<'_>, trace: &OracleTrace, limits: &Limits<'_>) -> Result<Evidence> {
    let (cfg, gates) = (subject.cfg, limits.gates);
    let bundle = limits.profile != Profile::Fp32;
    let prompt = token_gates::prompt_ids(subject.prompt, trace)?;
    let pixels = pixel_check(subject.preprocessor, trace)?;
    let oracle_tokens = trace.decode_tokens()?;
    // The oracle's own input to each layer and to the final norm: the text ladder's
    // updates, and (bundle profile) the local gates' inputs.
    let ids = &prompt.prompt.ids;
    let inputs = layer_inputs(cfg, ids, trace.has_image(), |n| trace.float(n))?;
    let (norm_input, layer_in) = inputs.split_last().expect("L + 1 layer inputs");
    let replay = bundle.then_some(layer_in);
    let runs = run_models(
        subject,
        trace,
        &prompt.prompt,
        &oracle_tokens,
        limits,
        replay,
    )?;
    let ours = &runs.reference.taps;
    let logits = ours.get(taps::LOGITS).expect("reference records logits");
    let rows = stage_rows(cfg, trace, ours, &inputs, limits)?;

    // Statistics over every scored position: the prompt, then the HF-seeded decode.
    let forced = runs.reference.continuations[0].logits.as_ref();
    let scored = Scored::new(trace, logits, forced)?;
    let budget = noise_budget(subject, trace, limits, &scored)?;
    let local = match limits.mode {
        Some((_, m)) => local_rows(trace, ours, layer_in, m.local_update_rel)?,
        None => vec![],
    };
    let norm_rel = match bundle {
        true => Some(norm_error(cfg, subject.src, trace, norm_input)?),
        false => None,
    };
    let firm = gates
        .firm_margin
        .max(gates.noise_z * SQRT_2 * scored.stats.noise);
    let sweep = scored.prompt_sweep(firm);
    let seeded = bundle.then(|| scored.decode_sweep(firm));
    let greedy_steps = limits.greedy_steps(oracle_tokens.len());
    let greedy = token_gates::greedy(&scored, &oracle_tokens, firm, greedy_steps);
    let engine = match &runs.engine {
        Some(e) => Some(EngineMatch::new(
            &trace.path,
            e,
            runs.reference.continuations[1].logits.as_ref(),
            logits,
            gates.firm_margin,
        )?),
        None => None,
    };
    Ok(Evidence {
        prompt,
        pixels,
        oracle_tokens,
        rows,
        local,
        norm_rel,
        budget,
        scored,
        firm,
        sweep,
        seeded,
        greedy,
        greedy_steps,
        engine,
    })
}

/// The noise the bundle's rounding allows on this trace (bundle profile, when the
/// rounding is known).
fn noise_budget(
    subject: &Subject<'_>,
    trace: &OracleTrace,
    limits: &Limits<'_>,
    scored: &Scored,
) -> Result<Option<NoiseBudget>> {
    let (Some(rounding), Some((_, m))) = (subject.rounding, limits.mode) else {
        return Ok(None);
    };
    let cfg = subject.cfg;
    Ok(Some(noise::budget(
        cfg,
        subject.src,
        rounding,
        trace.float(taps::TEXT_NORM)?,
        (&scored.oracle_prompt_ids, &trace.top_k("logits")?.1),
        m.layer_cos(cfg.text.num_hidden_layers.saturating_sub(1)),
    )?))
}

impl Evidence {
    /// The trace's report, with its `gates`.
    fn into_report(
        self,
        trace: &OracleTrace,
        limits: &Limits<'_>,
        gates: Vec<GateResult>,
    ) -> TraceReport {
        let decode_margins = self.scored.decode_margins();
        TraceReport {
            trace: trace.path.clone(),
            trace_sha256: trace.sha256.clone(),
            model: trace.meta("model").to_string(),
            oracle: trace.oracle().to_string(),
            prompt: trace.meta("prompt").to_string(),
            image: image_list(trace),
            profile: limits.profile,
            mode: limits.mode.map(|(m, _)| m.to_string()),
            vision_mode: limits
                .vision
                .filter(|v| Some(v.0) != limits.mode.map(|m| m.0))
                .map(|(v, _)| v.to_string()),
            tokens: self.prompt.prompt.ids.len(),
            rows: self.rows,
            local: self.local,
            pixels: self.pixels,
            firm_margin: self.firm,
            stats: self.scored.stats,
            positions: self.scored.positions,
            noise_budget: self.budget,
            sweep: self.sweep,
            decode: self.greedy.matched,
            decode_tokens: self.greedy.tokens,
            oracle_tokens: self.oracle_tokens,
            decode_margins,
            seeded: self.seeded,
            engine: self.engine,
            gates,
        }
    }
}

/// The trace's image files for the report, one per line (None for a text trace).
fn image_list(trace: &OracleTrace) -> Option<String> {
    let paths = trace.image_paths();
    (!paths.is_empty()).then(|| {
        paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join("\n")
    })
}
