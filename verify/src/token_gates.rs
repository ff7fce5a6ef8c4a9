//! The gates over tokens and next-token distributions: the prompt ids, the
//! statistics of every scored position (logit noise, KL divergence), and top-1
//! agreement at the positions that are firm for the measured noise.

use crate::error::Result;
use crate::gates::GateResult;
use crate::noise::NoiseBudget;
use crate::stats::{self, LogitStats, OracleRow, PositionStat};
use crate::tokens::{decode_match, top1_sweep, top2, DecodeMatch, Top1Sweep};
use crate::trace::OracleTrace;
use candle_core::Tensor;
use q3vl_model::prompt::{Prompt, PromptBuilder};

/// The trace's prompt (what the models run) and ours, rebuilt from the trace's text
/// and grid.
pub struct PromptIds {
    /// The trace's ids and M-RoPE positions.
    pub prompt: Prompt,
    /// Ours.
    pub rebuilt: Prompt,
}

/// Reads the trace's prompt and rebuilds ours with `builder`.
pub fn prompt_ids(builder: &PromptBuilder, trace: &OracleTrace) -> Result<PromptIds> {
    let ids = trace.input_ids()?;
    let positions = trace.positions()?;
    let grids = trace.grids()?;
    let rebuilt = match trace.messages()? {
        Some(messages) => builder.conversation(&messages, &grids)?,
        None => builder.chat_images(trace.meta("prompt"), &grids)?,
    };
    let next_position = positions.iter().flatten().copied().max().unwrap_or(-1) + 1;
    Ok(PromptIds {
        prompt: Prompt {
            ids,
            positions,
            next_position,
        },
        rebuilt,
    })
}

impl PromptIds {
    /// `prompt.ids`: our rebuilt prompt has the trace's ids and M-RoPE positions.
    pub fn gate(&self) -> GateResult {
        let (ours, ids) = (&self.rebuilt.ids, &self.prompt.ids);
        let first_diff = ours
            .iter()
            .zip(ids)
            .position(|(a, b)| a != b)
            .or((ours.len() != ids.len()).then_some(ours.len().min(ids.len())));
        let pos_ok = self.rebuilt.positions == self.prompt.positions;
        GateResult::new(
            "prompt.ids",
            first_diff.is_none() && pos_ok,
            format!("{}/{} ids", ours.len(), ids.len()),
            "exact ids and positions",
            match (first_diff, pos_ok) {
                (Some(i), _) => format!(
                    "first differing id at {i}: ours {:?}, oracle {:?}",
                    ours.get(i),
                    ids.get(i)
                ),
                (None, false) => "ids equal but M-RoPE positions differ".into(),
                _ => "ids and (t,h,w) positions equal".into(),
            },
        )
    }
}

/// Every scored position of one trace: the prompt (teacher-forced by construction)
/// and the decode steps with the oracle's tokens fed back.
pub struct Scored {
    /// Per-position figures, prompt first.
    pub positions: Vec<PositionStat>,
    /// How many of them are prompt positions.
    pub n_prompt: usize,
    /// Their summary.
    pub stats: LogitStats,
    /// The oracle's top-k ids at each prompt position.
    pub oracle_prompt_ids: Vec<Vec<i64>>,
    ours_top1: Vec<u32>,
    oracle_top1: Vec<u32>,
}

impl Scored {
    /// Scores our prompt logits `[T, V]` and forced decode logits `[D, V]` (None when
    /// the trace has no decode) against the trace.
    pub fn new(trace: &OracleTrace, prompt: &Tensor, forced: Option<&Tensor>) -> Result<Self> {
        let mut s = Scored {
            positions: vec![],
            n_prompt: 0,
            stats: stats::summarise(&[]),
            oracle_prompt_ids: vec![],
            ours_top1: vec![],
            oracle_top1: vec![],
        };
        s.add(trace, "logits", prompt)?;
        s.n_prompt = s.positions.len();
        s.oracle_prompt_ids = trace.top_k("logits")?.0;
        if let Some(f) = forced {
            s.add(trace, "decode", f)?;
        }
        s.stats = stats::summarise(&s.positions);
        Ok(s)
    }

    fn add(&mut self, trace: &OracleTrace, group: &str, ours: &Tensor) -> Result<()> {
        let (ids, vals) = trace.top_k(group)?;
        let lse = trace.lse(group)?;
        let full = trace.full_logits(group)?;
        let ours = ours.to_vec2::<f32>()?;
        for (r, row) in ours.iter().enumerate().take(ids.len()) {
            let oracle = OracleRow {
                top_ids: &ids[r],
                top_values: &vals[r],
                lse: lse.as_ref().map(|l| l[r]),
                full: full.as_ref().map(|f| f[r].as_slice()),
            };
            self.positions.push(stats::position(row, &oracle));
            self.ours_top1.push(top2(row).0);
            self.oracle_top1.push(ids[r][0] as u32);
        }
        Ok(())
    }

    /// Top-1 at the firm prompt positions.
    pub fn prompt_sweep(&self, firm: f64) -> Top1Sweep {
        let n = self.n_prompt;
        top1_sweep(
            &self.ours_top1[..n],
            &self.oracle_top1[..n],
            &self.margins()[..n],
            firm,
        )
    }

    /// Top-1 at the firm decode steps, the oracle's tokens fed back.
    pub fn decode_sweep(&self, firm: f64) -> Top1Sweep {
        let n = self.n_prompt;
        top1_sweep(
            &self.ours_top1[n..],
            &self.oracle_top1[n..],
            &self.margins()[n..],
            firm,
        )
    }

    /// The oracle's top-1 margin at each decode step.
    pub fn decode_margins(&self) -> Vec<f64> {
        self.margins()[self.n_prompt..].to_vec()
    }

    /// The oracle's top-1 minus top-2 at every scored position.
    fn margins(&self) -> Vec<f64> {
        self.positions.iter().map(|p| p.margin).collect()
    }

    /// Our top-1 at each decode step along the oracle's tokens.
    fn decode_top1(&self) -> &[u32] {
        &self.ours_top1[self.n_prompt..]
    }
}

/// What the statistics gates are held to.
pub enum StatLimits {
    /// The fp32 reference: the KL divergence at every position.
    Fp32 {
        /// Largest KL allowed anywhere.
        kld_max: f64,
    },
    /// A bundle: noise and mean KL against the quantization's allowance.
    Bundle {
        /// Multiplies the allowed σ.
        noise_factor: f64,
        /// Multiplies ½ · mean allowed σ².
        kld_factor: f64,
    },
}

/// `logits.noise` (bundles) and `logits.kld`.
pub fn statistics(
    scored: &Scored,
    budget: Option<&NoiseBudget>,
    limits: &StatLimits,
    firm: f64,
) -> Vec<GateResult> {
    let st = &scored.stats;
    let summary = format!(
        "{} positions: KL mean {}, p99 {}, max {} (position {}); top-1 agreement {}/{} ({:.1}%); noise σ {:.4}; firm margin {firm:.3}",
        st.positions,
        fmt_opt(st.kld_mean),
        fmt_opt(st.kld_p99),
        fmt_opt(st.kld_max),
        st.kld_max_at,
        st.agree,
        st.positions,
        st.agreement * 100.0,
        st.noise,
    );
    let Some(kld_mean) = st.kld_mean else {
        return vec![GateResult::new(
            "logits.kld",
            false,
            "unknown",
            "a trace with log-sum-exp (v2) or full logits",
            "the trace records only top-k logits (v1): make it again with oracle/trace.py",
        )];
    };
    match *limits {
        StatLimits::Fp32 { kld_max } => {
            let max = st.kld_max.unwrap_or(f64::NAN);
            vec![GateResult::new(
                "logits.kld",
                max <= kld_max,
                format!("{max:.3e}"),
                format!("KL ≤ {kld_max:e} at every position"),
                summary,
            )]
        }
        StatLimits::Bundle {
            noise_factor,
            kld_factor,
        } => {
            let Some(b) = budget else {
                return vec![GateResult::new(
                    "logits.noise",
                    false,
                    format!("{:.4}", st.noise),
                    "the bundle's noise allowance",
                    "no allowance could be computed (the bundle's rounding is unknown)",
                )];
            };
            let allowed = noise_factor * b.sigma;
            let kld_allowed = kld_factor * 0.5 * b.mean_var;
            vec![
                GateResult::new(
                    "logits.noise",
                    st.noise <= allowed,
                    format!("{:.4}", st.noise),
                    format!("σ ≤ {allowed:.4} (quantization allowance × {noise_factor})"),
                    format!(
                        "measured logit noise (median RMS error on the oracle's top-k) against the head's rounding plus what the layer gate lets through; head alone {:.4}",
                        stats::median(&b.head_var).sqrt()
                    ),
                ),
                GateResult::new(
                    "logits.kld",
                    kld_mean <= kld_allowed,
                    format!("{kld_mean:.3e}"),
                    format!("mean KL ≤ {kld_allowed:.3e} (½ · allowed σ² × {kld_factor})"),
                    summary,
                ),
            ]
        }
    }
}

fn fmt_opt(x: Option<f64>) -> String {
    x.map_or("unknown".into(), |v| format!("{v:.3e}"))
}

/// `prompt.top1`: every firm prompt position keeps the oracle's top-1.
pub fn top1_gate(sweep: &Top1Sweep, firm: f64, scored: &Scored) -> GateResult {
    let all = &scored.positions[..scored.n_prompt];
    let agree = all.iter().filter(|p| p.agree).count();
    if sweep.firm == 0 {
        return nothing_firm("prompt.top1", firm, all);
    }
    GateResult::new(
        "prompt.top1",
        sweep.mismatches.is_empty(),
        format!("{}/{}", sweep.agree, sweep.firm),
        format!("every firm position (margin ≥ {firm:.3})"),
        match sweep.mismatches.first() {
            Some((p, a, b)) => format!("position {p}: ours {a}, oracle {b}"),
            None => format!(
                "{} ambiguous positions not counted; all positions {agree}/{}",
                sweep.ambiguous.len(),
                all.len()
            ),
        },
    )
}

/// `decode.seeded`: every firm decode step, the oracle's tokens fed back.
pub fn seeded_gate(s: &Top1Sweep, firm: f64, scored: &Scored) -> GateResult {
    if s.firm == 0 {
        return nothing_firm("decode.seeded", firm, &scored.positions[scored.n_prompt..]);
    }
    GateResult::new(
        "decode.seeded",
        s.mismatches.is_empty(),
        format!("{}/{}", s.agree, s.firm),
        format!("every firm oracle step (margin ≥ {firm:.3})"),
        match s.mismatches.first() {
            Some((p, a, b)) => format!("step {p}: ours {a}, oracle {b}"),
            None => format!("{} ambiguous steps not counted", s.ambiguous.len()),
        },
    )
}

/// A top-1 gate with no firm position: skipped, saying what the largest margin was.
fn nothing_firm(name: &str, firm: f64, positions: &[PositionStat]) -> GateResult {
    let largest = positions
        .iter()
        .map(|p| p.margin)
        .fold(f64::NEG_INFINITY, f64::max);
    GateResult::skipped(
        name,
        "0/0",
        format!("every firm position (margin ≥ {firm:.3})"),
        format!(
            "no position of {} is firm (largest oracle margin {largest:.3}); logits.kld and logits.noise count them all",
            positions.len()
        ),
    )
}

/// The free-running greedy decode, compared with the oracle's.
pub struct Greedy {
    /// Our tokens: the oracle's prefix up to our first different choice, then it.
    pub tokens: Vec<u32>,
    /// The comparison.
    pub matched: DecodeMatch,
    oracle: Vec<u32>,
}

/// Our free-running greedy decode is the forced one up to the first step where we
/// choose differently (both have seen the same prefix until then).
pub fn greedy(scored: &Scored, oracle: &[u32], firm: f64, limit: usize) -> Greedy {
    let forced = scored.decode_top1();
    let tokens: Vec<u32> = match forced.iter().zip(oracle).position(|(a, b)| a != b) {
        Some(k) => oracle[..k].iter().copied().chain([forced[k]]).collect(),
        None => forced.to_vec(),
    };
    let matched = decode_match(&tokens, oracle, &scored.decode_margins(), firm, limit);
    Greedy {
        tokens,
        matched,
        oracle: oracle.to_vec(),
    }
}

impl Greedy {
    /// `decode.greedy`: the first `limit` steps match, counted to the first
    /// ambiguous oracle step; with a decode to compare, at least one step counts.
    pub fn gate(&self, firm: f64, limit: usize) -> GateResult {
        let d = &self.matched;
        let threshold =
            format!("first {limit} steps, counted to the first oracle margin < {firm:.3}");
        if d.counted == 0 {
            let why = match self.oracle.is_empty() || limit == 0 {
                true => "the trace has no decode steps to compare",
                false => "the oracle's first step is already ambiguous; decode.seeded and logits.kld count every step",
            };
            return GateResult::skipped("decode.greedy", "0/0", threshold, why);
        }
        GateResult::new(
            "decode.greedy",
            d.passed(),
            format!("{}/{}", d.matched, d.counted),
            threshold,
            match (d.first_mismatch, d.first_ambiguous) {
                (Some(i), _) => format!(
                    "step {i}: ours {}, oracle {}",
                    self.tokens[i], self.oracle[i]
                ),
                (None, Some(a)) => format!("count stops at ambiguous oracle step {a}"),
                (None, None) => "no ambiguous step".into(),
            },
        )
    }
}
