//! The ladder: the reference run on one trace's inputs, compared stage by stage with
//! what the oracle recorded, then turned into gates. The same code serves the fp32
//! ladder (original checkpoint) and the quantized ladder (a bundle's weights).

use crate::compare::{agreement, diff, flat, Agreement};
use crate::engine_gate::{run_engine, EngineMatch};
use crate::error::{Result, VerifyError};
use crate::gates::{GateResult, Gates};
use crate::tokens::{decode_match, margins, top1_sweep, DecodeMatch, Top1Sweep};
use crate::trace::OracleTrace;
use candle_core::Tensor;
use q3vl_engine::Engine;
use q3vl_model::image::{self, Resize};
use q3vl_model::prompt::{Prompt, PromptBuilder};
use q3vl_model::reference::{self, argmax_rows, Continuation, ImageInput};
use q3vl_model::{taps, PreprocessorConfig, Qwen3VlConfig, WeightSource};
use serde::Serialize;
use std::collections::BTreeMap;
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
}

/// One compared stage.
#[derive(Debug, Clone, Serialize)]
pub struct StageRow {
    /// `vision`, `text` or `logits`.
    pub stage: &'static str,
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

/// Everything one trace's verification found.
#[derive(Debug, Clone, Serialize)]
pub struct TraceReport {
    /// The trace file.
    pub trace: PathBuf,
    /// Its sha256.
    pub trace_sha256: String,
    /// The model the oracle ran.
    pub model: String,
    /// The user prompt.
    pub prompt: String,
    /// The image file, for image traces.
    pub image: Option<String>,
    /// Thresholds used.
    pub profile: Profile,
    /// Prompt length.
    pub tokens: usize,
    /// Stage-by-stage comparison.
    pub rows: Vec<StageRow>,
    /// Max |pixel difference| of our preprocessing, and whether a resize happened.
    pub pixels: Option<(f64, bool)>,
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

/// Refuses a trace whose shapes do not fit the model (a trace of another model).
pub fn check_fits(cfg: &Qwen3VlConfig, trace: &OracleTrace) -> Result<()> {
    let h = cfg.text.hidden_size;
    let d = trace.float("text.embed")?.dims().to_vec();
    if d[1] != h {
        return Err(mismatch(
            trace,
            format!("text.embed is {d:?} but the model's hidden size is {h}"),
        ));
    }
    for i in 0..cfg.text.num_hidden_layers {
        trace.float(&taps::text_layer(i))?;
    }
    if trace
        .float_opt(&taps::text_layer(cfg.text.num_hidden_layers))
        .is_some()
    {
        return Err(mismatch(
            trace,
            format!(
                "the trace has more than the model's {} decoder layers",
                cfg.text.num_hidden_layers
            ),
        ));
    }
    let v = cfg.text.vocab_size as i64;
    if let Some(bad) = trace.int("input_ids")?.1.iter().find(|&&x| x < 0 || x >= v) {
        return Err(mismatch(
            trace,
            format!("input id {bad} is outside the vocabulary ({v})"),
        ));
    }
    if let Some(grid) = trace.grid_thw()? {
        let pv = trace.float("pixel_values")?.dims().to_vec();
        let p: usize = grid.iter().product();
        if pv != [p, cfg.vision.patch_dim()] {
            return Err(mismatch(
                trace,
                format!(
                    "pixel_values is {pv:?}, the model needs [{p}, {}]",
                    cfg.vision.patch_dim()
                ),
            ));
        }
        let e = trace.float(taps::VISION_EMBED)?.dims().to_vec();
        if e != [p, cfg.vision.hidden_size] {
            return Err(mismatch(
                trace,
                format!(
                    "vision.embed is {e:?}, the model's vision width is {}",
                    cfg.vision.hidden_size
                ),
            ));
        }
        for j in 0..cfg.vision.depth {
            trace.float(&taps::vision_block(j))?;
        }
        if trace
            .float_opt(&taps::vision_block(cfg.vision.depth))
            .is_some()
        {
            return Err(mismatch(
                trace,
                format!("the trace has more than {} ViT blocks", cfg.vision.depth),
            ));
        }
        for k in 0..cfg.vision.deepstack_visual_indexes.len() {
            trace.float(&taps::vision_deepstack(k))?;
        }
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

/// Runs the reference on the trace's inputs and compares everything.
pub fn verify_trace(
    subject: &Subject<'_>,
    trace: &OracleTrace,
    gates: &Gates,
    profile: Profile,
) -> Result<TraceReport> {
    let cfg = subject.cfg;
    check_fits(cfg, trace)?;
    let firm = gates.firm_margin;
    let mut results = Vec::new();

    // 1. The prompt pipeline reproduces HF's ids and positions from the prompt text.
    let ids = trace.input_ids()?;
    let positions = trace.positions()?;
    let grid = trace.grid_thw()?;
    let rebuilt = subject.prompt.chat(trace.meta("prompt"), grid)?;
    let first_diff = rebuilt
        .ids
        .iter()
        .zip(&ids)
        .position(|(a, b)| a != b)
        .or((rebuilt.ids.len() != ids.len()).then_some(rebuilt.ids.len().min(ids.len())));
    let pos_ok = rebuilt.positions == positions;
    results.push(GateResult::new(
        "prompt.ids",
        first_diff.is_none() && pos_ok,
        format!("{}/{} ids", rebuilt.ids.len(), ids.len()),
        "exact ids and positions",
        match (first_diff, pos_ok) {
            (Some(i), _) => format!(
                "first differing id at {i}: ours {:?}, oracle {:?}",
                rebuilt.ids.get(i),
                ids.get(i)
            ),
            (None, false) => "ids equal but M-RoPE positions differ".into(),
            _ => "ids and (t,h,w) positions equal".into(),
        },
    ));

    // 2. Our preprocessing against the oracle's pixel values.
    let pixels = pixel_check(subject, trace)?;
    // After a resize the difference is a reported figure (TraceReport::pixels), not a gate.
    if let Some((m, false)) = pixels {
        let limit = gates.fp32.pixel_max_abs;
        results.push(GateResult::new(
            "image.pixels",
            m <= limit,
            format!("{m:.3e}"),
            format!("≤ {limit:e}"),
            "no resize: rescale + normalise + patchify must match",
        ));
    }

    // 3. The reference, fed the oracle's own pixel values and ids.
    let prompt = Prompt {
        next_position: positions
            .iter()
            .flat_map(|p| p.iter())
            .copied()
            .max()
            .unwrap_or(-1)
            + 1,
        ids: ids.clone(),
        positions,
    };
    let oracle_tokens = trace.decode_tokens()?;
    let (_, dvals) = trace.top_k("decode")?;
    let decode_margins = margins(&dvals);
    // One teacher-forced pass along the oracle's tokens serves every decode gate:
    // free-running greedy decode equals it up to the first mismatch, where the count stops.
    let mut conts = vec![Continuation::Forced(oracle_tokens.clone())];
    let pv;
    let image = match grid {
        Some(g) => {
            pv = trace.float("pixel_values")?.clone();
            Some(ImageInput {
                pixel_values: &pv,
                grid_thw: g,
            })
        }
        None => None,
    };
    // Engine ≡ reference: the engine decodes greedily on the same ids and pixel values;
    // a second teacher-forced pass, along its tokens, gives the reference's choices.
    let engine_run = match (profile, subject.engine) {
        (Profile::Bundle, Some(engine)) => {
            let steps = match gates.bundle.engine_steps {
                0 => oracle_tokens.len(),
                n => n,
            };
            let pixels = match &image {
                Some(img) => Some((flat(img.pixel_values)?.0, img.grid_thw)),
                None => None,
            };
            let pixels = pixels.as_ref().map(|(v, g)| (v.as_slice(), *g));
            let run = run_engine(engine, &ids, pixels, steps)?;
            // The engine read every weight through its own maps; drop them from the
            // resident set before the streamed reference runs, so the two peaks do not add.
            engine.language().release_all();
            engine.vision_bundle().release_all();
            conts.push(Continuation::Forced(run.tokens.clone()));
            Some(run)
        }
        _ => None,
    };
    let run = reference::run(
        cfg,
        subject.src,
        &prompt,
        image,
        &conts,
        subject.keep_weights,
    )?;

    // 4. Stage by stage.
    let rows = stage_rows(cfg, trace, &run.taps, gates, profile)?;
    for (stage, gate) in [("vision", "vision.ladder"), ("text", "text.ladder")] {
        let gated: Vec<&StageRow> = rows
            .iter()
            .filter(|r| r.stage == stage && r.gated)
            .collect();
        if gated.is_empty() {
            continue;
        }
        let worst = gated
            .iter()
            .min_by(|a, b| a.cos.total_cmp(&b.cos))
            .expect("non-empty");
        let failed: Vec<&str> = gated
            .iter()
            .filter(|r| !r.passed)
            .map(|r| r.name.as_str())
            .collect();
        let threshold = match (profile, stage) {
            (Profile::Fp32, _) => format!(
                "cos ≥ {}, token cos ≥ {}, update cos ≥ {}",
                gates.fp32.stage_cos, gates.fp32.token_cos_min, gates.fp32.update_cos
            ),
            (Profile::Bundle, "vision") => {
                format!("merger/DeepStack cos ≥ {}", gates.bundle.vision_cos)
            }
            (Profile::Bundle, _) => format!("layer cos ≥ {}", gates.bundle.layer_cos),
        };
        results.push(GateResult::new(
            gate,
            failed.is_empty(),
            format!("{:.7}", worst.cos),
            threshold,
            if failed.is_empty() {
                format!(
                    "{} stages; worst {} (cos {:.7})",
                    gated.len(),
                    worst.name,
                    worst.cos
                )
            } else {
                format!(
                    "first failing stage {} ({} failing)",
                    failed[0],
                    failed.len()
                )
            },
        ));
    }

    // 5. Prompt top-1 at firm positions (teacher-forced sweep).
    let logits = run
        .taps
        .get(taps::LOGITS)
        .expect("reference records logits");
    let ours_top1 = argmax_rows(logits)?;
    let (pids, pvals) = trace.top_k("logits")?;
    let oracle_top1: Vec<u32> = pids.iter().map(|r| r[0] as u32).collect();
    let sweep = top1_sweep(&ours_top1, &oracle_top1, &margins(&pvals), firm);
    results.push(GateResult::new(
        "prompt.top1",
        sweep.mismatches.is_empty(),
        format!("{}/{}", sweep.agree, sweep.firm),
        format!("every firm position (margin ≥ {firm})"),
        match sweep.mismatches.first() {
            Some((p, a, b)) => format!("position {p}: ours {a}, oracle {b}"),
            None => format!("{} ambiguous positions skipped", sweep.ambiguous.len()),
        },
    ));

    // 6. HF-seeded decode (bundle): the oracle's tokens fed back, top-1 per step.
    let forced_top1 = match &run.continuations[0].logits {
        Some(l) => argmax_rows(l)?,
        None => vec![],
    };
    let seeded = if profile == Profile::Bundle {
        let tops = &forced_top1;
        let s = top1_sweep(tops, &oracle_tokens, &decode_margins, firm);
        results.push(GateResult::new(
            "decode.seeded",
            s.mismatches.is_empty(),
            format!("{}/{}", s.agree, s.firm),
            "every firm oracle step",
            match s.mismatches.first() {
                Some((p, a, b)) => format!("step {p}: ours {a}, oracle {b}"),
                None => format!("{} ambiguous steps skipped", s.ambiguous.len()),
            },
        ));
        Some(s)
    } else {
        None
    };

    // 7. Free-running greedy decode: our choices along the oracle's prefix, which is
    // our own prefix until the first step where we choose differently.
    let first_diff = forced_top1
        .iter()
        .zip(&oracle_tokens)
        .position(|(a, b)| a != b);
    let ours_tokens: Vec<u32> = match first_diff {
        Some(k) => oracle_tokens[..k]
            .iter()
            .copied()
            .chain([forced_top1[k]])
            .collect(),
        None => forced_top1.clone(),
    };
    let limit = match profile {
        Profile::Fp32 if gates.fp32.decode_steps > 0 => gates.fp32.decode_steps,
        Profile::Fp32 => oracle_tokens.len(),
        Profile::Bundle => gates.bundle.free_decode_steps,
    };
    let decode = decode_match(&ours_tokens, &oracle_tokens, &decode_margins, firm, limit);
    results.push(GateResult::new(
        "decode.greedy",
        decode.passed() && (decode.counted > 0 || oracle_tokens.is_empty()),
        format!("{}/{}", decode.matched, decode.counted),
        format!("first {limit} steps, counted to the first ambiguous oracle step"),
        match (decode.first_mismatch, decode.first_ambiguous) {
            (Some(i), _) => format!(
                "step {i}: ours {}, oracle {}",
                ours_tokens[i], oracle_tokens[i]
            ),
            (None, Some(a)) => format!("count stops at ambiguous oracle step {a}"),
            (None, None) => "no ambiguous step".into(),
        },
    ));

    // 8. Engine ≡ reference on the bundle's weights.
    let engine = match &engine_run {
        Some(e) => {
            let m = EngineMatch::new(
                &trace.path,
                e,
                run.continuations[1].logits.as_ref(),
                logits,
                firm,
            )?;
            results.push(m.gate(firm));
            Some(m)
        }
        None => None,
    };

    Ok(TraceReport {
        trace: trace.path.clone(),
        trace_sha256: trace.sha256.clone(),
        model: trace.meta("model").to_string(),
        prompt: trace.meta("prompt").to_string(),
        image: trace.image_path().map(|p| p.display().to_string()),
        profile,
        tokens: ids.len(),
        rows,
        pixels,
        sweep,
        decode,
        decode_tokens: ours_tokens,
        oracle_tokens,
        decode_margins,
        seeded,
        engine,
        gates: results,
    })
}

/// Compares every tap with the oracle's and applies the profile's row gates.
fn stage_rows(
    cfg: &Qwen3VlConfig,
    trace: &OracleTrace,
    ours: &BTreeMap<String, Tensor>,
    gates: &Gates,
    profile: Profile,
) -> Result<Vec<StageRow>> {
    let mut rows = Vec::new();
    let get = |m: &BTreeMap<String, Tensor>, n: &str| -> Result<(Vec<f32>, usize)> {
        flat(
            m.get(n)
                .ok_or_else(|| mismatch(trace, format!("the reference produced no {n}")))?,
        )
    };
    let oracle = |n: &str| -> Result<(Vec<f32>, usize)> { flat(trace.float(n)?) };
    let fp = &gates.fp32;
    let row = |stage: &'static str,
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
            "vision",
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
                "vision",
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
            let pass = match profile {
                Profile::Fp32 => fp32_pass(&a, None),
                Profile::Bundle => a.cos >= gates.bundle.vision_cos,
            };
            let idx = if k == 0 { None } else { Some(k - 1) };
            rows.push(row("vision", n, idx, a, None, true, pass));
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
        "text",
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
        let pass = match profile {
            Profile::Fp32 => fp32_pass(&a, Some(up)),
            Profile::Bundle => a.cos >= gates.bundle.layer_cos,
        };
        rows.push(row("text", n, Some(i), a, Some(up), true, pass));
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
        "text",
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
                "logits",
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
