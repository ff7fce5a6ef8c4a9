//! The engine ≡ reference gate. The engine decodes greedily on exactly the trace's
//! inputs (its prompt ids, its pixel values and grid), keeping the logits of every
//! step. The reference then runs once, teacher-forced along the engine's tokens, on
//! the same bundle's dequantized weights. At every step both have seen the same
//! prefix, so "the engine's token is the reference's top-1 at every step" is, by
//! induction, "the two greedy decodes are equal", and the per-step logits cosine
//! compares like with like. Every step counts, also after an ambiguous one: the
//! (centered) logits cosine of every step must reach its threshold and the top-1 of
//! every firm step must agree, so a reference that is ambiguous at its first step
//! leaves nothing vacuous. Where the two greedy decodes stay equal is reported.
//!
//! The prompt is compared too, position by position: the engine scores it in one
//! prefill ([`Engine::prompt_logits`]) and the reference's prompt logits are its
//! `logits` tap. Every firm position's top-1 must agree, and the smallest logits
//! cosine is reported (a fault in the prefill's other rows reaches the generated
//! tokens only through the cache, and may not show there).

use crate::compare::centered_cosine as cosine;
use crate::error::{Result, VerifyError};
use crate::gates::GateResult;
use crate::tokens::{decode_match, top1_sweep, top2, DecodeMatch, Top1Sweep};
use candle_core::Tensor;
use q3vl_engine::{Engine, GenerateParams};
use serde::Serialize;
use std::path::Path;

/// Stable name of the gate.
pub const GATE: &str = "engine.reference";

/// What the engine produced on a trace's inputs.
#[derive(Debug, Clone)]
pub struct EngineDecode {
    /// Greedy tokens (eos does not stop it).
    pub tokens: Vec<u32>,
    /// The `[V]` logits that chose each token.
    pub logits: Vec<Vec<f32>>,
    /// The `[V]` logits at every prompt position.
    pub prompt_logits: Vec<Vec<f32>>,
}

/// Runs `engine` greedily for `steps` tokens on prompt `ids` and its images: each
/// one's model-ready patch rows `[P, C·T·p·p]` (flattened) with its grid.
pub fn run_engine(
    engine: &Engine,
    ids: &[u32],
    images: &[(&[f32], [usize; 3])],
    steps: usize,
) -> Result<EngineDecode> {
    let features = images
        .iter()
        .map(|&(pv, grid)| Ok(std::sync::Arc::new(engine.encode_image(pv, grid)?)))
        .collect::<Result<Vec<_>>>()?;
    let params = GenerateParams {
        max_new_tokens: steps,
        temperature: 0.0,
        ignore_eos: true,
        keep_logits: true,
        ..GenerateParams::default()
    };
    let g = engine.generate(ids, &features, &params, &mut |_| {})?;
    let prompt_logits = engine.prompt_logits(ids, &features)?;
    Ok(EngineDecode {
        tokens: g.tokens,
        logits: g.step_logits,
        prompt_logits,
    })
}

/// The engine's greedy decode against the reference's choices along it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EngineMatch {
    /// Steps run.
    pub steps: usize,
    /// The engine's greedy tokens.
    pub engine_tokens: Vec<u32>,
    /// The reference's top-1 at each step, given the engine's tokens before it.
    pub reference_tokens: Vec<u32>,
    /// The reference's top-1 minus top-2 at each step.
    pub reference_margins: Vec<f64>,
    /// Centered cosine (float64) of the engine's and the reference's logits at each
    /// step.
    pub logits_cos: Vec<f64>,
    /// The smallest of them (1 when no step ran).
    pub min_logits_cos: f64,
    /// Where it is.
    pub min_logits_cos_step: usize,
    /// Leading steps where the two greedy decodes are equal, counted up to the first
    /// ambiguous reference step (reported).
    pub count: DecodeMatch,
    /// Top-1 at every firm step: with the reference forced along the engine's
    /// tokens both always see the same prefix (gated).
    pub forced: Top1Sweep,
    /// Centered cosine (float64) of the engine's and the reference's logits at each
    /// prompt position.
    pub prompt_logits_cos: Vec<f64>,
    /// The smallest of them (1 for an empty prompt).
    pub min_prompt_logits_cos: f64,
    /// Where it is.
    pub min_prompt_logits_cos_position: usize,
    /// The engine's top-1 against the reference's at every firm prompt position
    /// (gated: every one must agree).
    pub prompt: Top1Sweep,
}

impl EngineMatch {
    /// Compares the engine's decode with the reference's `[steps, V]` logits along it
    /// (None when no step ran), counting up to the first step whose reference margin
    /// is below `firm`, and the engine's prompt logits with the reference's
    /// `[prompt, V]` ones.
    pub fn new(
        trace: &Path,
        engine: &EngineDecode,
        reference: Option<&Tensor>,
        reference_prompt: &Tensor,
        firm: f64,
    ) -> Result<Self> {
        let bad = |msg: String| VerifyError::Mismatch {
            path: trace.to_path_buf(),
            msg,
        };
        let steps = engine.tokens.len();
        let rows: Vec<Vec<f32>> = match reference {
            Some(t) => t.to_vec2::<f32>()?,
            None => vec![],
        };
        if rows.len() != steps || engine.logits.len() != steps {
            return Err(bad(format!(
                "engine ≡ reference: the engine ran {steps} steps with {} logit rows, the reference {}",
                engine.logits.len(),
                rows.len()
            )));
        }
        let s = Compared::new(&engine.logits, &rows, "step").map_err(bad)?;
        let (min_logits_cos_step, min_logits_cos) = min_at(&s.cos);
        let count = decode_match(&engine.tokens, &s.reference_top1, &s.margins, firm, steps);
        let forced = top1_sweep(&engine.tokens, &s.reference_top1, &s.margins, firm);

        let prompt_rows = reference_prompt.to_vec2::<f32>()?;
        if prompt_rows.len() != engine.prompt_logits.len() {
            return Err(bad(format!(
                "engine ≡ reference: the engine scored {} prompt positions, the reference {}",
                engine.prompt_logits.len(),
                prompt_rows.len()
            )));
        }
        let p =
            Compared::new(&engine.prompt_logits, &prompt_rows, "prompt position").map_err(bad)?;
        let (min_prompt_logits_cos_position, min_prompt_logits_cos) = min_at(&p.cos);
        let prompt = top1_sweep(&p.engine_top1, &p.reference_top1, &p.margins, firm);
        Ok(EngineMatch {
            prompt_logits_cos: p.cos,
            min_prompt_logits_cos,
            min_prompt_logits_cos_position,
            prompt,
            steps,
            count,
            forced,
            engine_tokens: engine.tokens.clone(),
            reference_tokens: s.reference_top1,
            reference_margins: s.margins,
            logits_cos: s.cos,
            min_logits_cos,
            min_logits_cos_step,
        })
    }

    /// Whether the gate passes: at least one step ran, every step's and every prompt
    /// position's logits cosine reaches `min_cos`, and every firm step's and firm
    /// prompt position's top-1 is equal.
    pub fn passed(&self, min_cos: f64) -> bool {
        self.steps > 0
            && self.min_logits_cos >= min_cos
            && self.min_prompt_logits_cos >= min_cos
            && self.forced.mismatches.is_empty()
            && self.prompt.mismatches.is_empty()
    }

    /// Steps that pass both checks: logits cosine ≥ `min_cos`, and the same top-1
    /// wherever the reference's margin made the step firm.
    pub fn steps_ok(&self, min_cos: f64) -> usize {
        let flipped = |k: usize| self.forced.mismatches.iter().any(|m| m.0 == k);
        (0..self.steps)
            .filter(|&k| self.logits_cos[k] >= min_cos && !flipped(k))
            .count()
    }

    /// The gate's result line.
    pub fn gate(&self, firm: f64, min_cos: f64) -> GateResult {
        let (c, f, p) = (&self.count, &self.forced, &self.prompt);
        let figures = format!(
            "top-1 equal at {}/{} firm steps; min logits cos {:.7} at step {}; prompt: top-1 {}/{} firm positions, min logits cos {:.7} at position {}; greedy decodes equal for {} steps{}",
            f.agree,
            f.firm,
            self.min_logits_cos,
            self.min_logits_cos_step,
            p.agree,
            p.firm,
            self.min_prompt_logits_cos,
            self.min_prompt_logits_cos_position,
            c.matched,
            match c.first_ambiguous {
                Some(a) => format!(" (reference ambiguous from step {a}, margin {:.3})", self.reference_margins[a]),
                None => String::new(),
            }
        );
        let detail = match (f.mismatches.first(), p.mismatches.first()) {
            (Some(&(i, e, r)), _) => format!(
                "step {i}: engine {e}, reference {r} (margin {:.3}); {figures}",
                self.reference_margins[i]
            ),
            (None, Some(&(i, e, r))) => {
                format!("prompt position {i}: engine top-1 {e}, reference {r}; {figures}")
            }
            (None, None) if self.steps == 0 => format!("no step ran; {figures}"),
            (None, None) => figures,
        };
        GateResult::new(
            GATE,
            self.passed(min_cos),
            format!("{}/{}", self.steps_ok(min_cos), self.steps),
            format!(
                "{} steps: logits cos ≥ {min_cos} at each, top-1 equal where the reference margin ≥ {firm}",
                self.steps
            ),
            detail,
        )
    }
}

/// The engine's logits rows against the reference's, row by row.
struct Compared {
    /// The engine's top-1 of each row.
    engine_top1: Vec<u32>,
    /// The reference's.
    reference_top1: Vec<u32>,
    /// The reference's top-1 minus top-2.
    margins: Vec<f64>,
    /// Centered cosine (float64) of the two rows.
    cos: Vec<f64>,
}

impl Compared {
    /// Compares equally many rows; `what` names a row in the error of a row whose
    /// widths differ.
    fn new(
        engine: &[Vec<f32>],
        reference: &[Vec<f32>],
        what: &str,
    ) -> std::result::Result<Self, String> {
        let mut c = Compared {
            engine_top1: Vec::with_capacity(engine.len()),
            reference_top1: Vec::with_capacity(engine.len()),
            margins: Vec::with_capacity(engine.len()),
            cos: Vec::with_capacity(engine.len()),
        };
        for (k, (e, r)) in engine.iter().zip(reference).enumerate() {
            if e.len() != r.len() {
                return Err(format!(
                    "engine ≡ reference: {what} {k} has {} engine logits and {} reference logits",
                    e.len(),
                    r.len()
                ));
            }
            let (t, m) = top2(r);
            c.engine_top1.push(top2(e).0);
            c.reference_top1.push(t);
            c.margins.push(m);
            c.cos.push(cosine(e, r));
        }
        Ok(c)
    }
}

/// Where the smallest cosine is, and it ((0, 1) when there is none).
fn min_at(cos: &[f64]) -> (usize, f64) {
    cos.iter()
        .copied()
        .enumerate()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or((0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Prompt logits both sides agree on (position 1 is a near tie).
    const PROMPT: [[f32; 3]; 3] = [[0.0, 4.0, 1.0], [2.0, 1.97, 0.0], [0.0, 0.5, 3.0]];

    fn decode(tokens: &[u32], rows: &[[f32; 3]]) -> EngineDecode {
        EngineDecode {
            tokens: tokens.to_vec(),
            logits: rows.iter().map(|r| r.to_vec()).collect(),
            prompt_logits: PROMPT.iter().map(|r| r.to_vec()).collect(),
        }
    }

    fn compare(e: &EngineDecode, rows: Option<&[[f32; 3]]>) -> Result<EngineMatch> {
        let steps = rows.map(reference);
        EngineMatch::new(Path::new("t"), e, steps.as_ref(), &reference(&PROMPT), 0.1)
    }

    fn reference(rows: &[[f32; 3]]) -> Tensor {
        let v: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::from_vec(v, (rows.len(), 3), &Device::Cpu).unwrap()
    }

    #[test]
    fn equal_decodes_pass_and_report_the_worst_cosine() {
        let rows = [[3.0, 0.0, 1.0], [0.0, 2.0, 1.0], [0.0, 0.0, 4.0]];
        let e = decode(
            &[0, 1, 2],
            &[[3.0, 0.0, 1.0], [0.0, 2.0, 1.5], [0.0, 0.0, 4.0]],
        );
        let m = compare(&e, Some(&rows)).unwrap();
        assert!(m.passed(0.5));
        assert_eq!((m.count.counted, m.count.matched), (3, 3));
        assert_eq!(m.min_logits_cos_step, 1);
        assert!(m.min_logits_cos < 0.99 && (m.logits_cos[0] - 1.0).abs() < 1e-12);
        assert_eq!(m.gate(0.1, 0.5).value, "3/3");
        // The cosine is gated too: step 1's is below 0.99.
        assert!(!m.passed(0.99) && !m.gate(0.1, 0.99).passed);
    }

    #[test]
    fn a_different_token_at_a_firm_step_fails_there() {
        let rows = [[3.0, 0.0, 1.0], [0.0, 2.0, 1.0]];
        let e = decode(&[0, 2], &[[3.0, 0.0, 1.0], [0.0, 1.0, 2.0]]);
        let m = compare(&e, Some(&rows)).unwrap();
        assert!(!m.passed(0.0));
        assert_eq!(m.count.first_mismatch, Some(1));
        let g = m.gate(0.1, 0.0);
        assert!(
            !g.passed && g.detail.starts_with("step 1: engine 2, reference 1"),
            "{}",
            g.detail
        );
    }

    #[test]
    fn every_step_counts_also_after_an_ambiguous_one() {
        // Step 0 is a near tie in the reference: the engine may choose either, and the
        // greedy decodes' equality is no longer counted, but every later firm step is.
        let rows = [[1.0, 1.05, 0.0], [3.0, 0.0, 1.0], [0.0, 2.0, 1.0]];
        let e = decode(&[0, 0, 1], &rows);
        let m = compare(&e, Some(&rows)).unwrap();
        assert!(m.passed(0.999));
        assert_eq!((m.count.counted, m.count.first_ambiguous), (0, Some(0)));
        assert_eq!((m.forced.firm, m.forced.agree), (2, 2));
        let g = m.gate(0.1, 0.999);
        assert_eq!(g.value, "3/3");
        assert!(
            g.detail.contains("reference ambiguous from step 0"),
            "{}",
            g.detail
        );

        // A firm flip after the ambiguous step still fails.
        let e = decode(&[0, 0, 2], &rows);
        let m = compare(&e, Some(&rows)).unwrap();
        assert!(!m.passed(0.0));
        assert!(m
            .gate(0.1, 0.0)
            .detail
            .starts_with("step 2: engine 2, reference 1"));

        let m = compare(&decode(&[], &[]), None).unwrap();
        assert!(!m.passed(0.0));
        assert!(m.gate(0.1, 0.0).detail.starts_with("no step ran"));
    }

    #[test]
    fn a_reference_of_another_length_is_an_error() {
        let rows = [[3.0, 0.0, 1.0]];
        let e = decode(&[0, 0], &[[3.0, 0.0, 1.0], [3.0, 0.0, 1.0]]);
        assert!(compare(&e, Some(&rows)).is_err());
    }

    #[test]
    fn the_prompt_is_gated_at_its_firm_positions() {
        let rows = [[3.0, 0.0, 1.0]];
        let m = compare(&decode(&[0], &rows), Some(&rows)).unwrap();
        assert!(m.passed(0.999));
        assert_eq!((m.prompt.firm, m.prompt.agree), (2, 2));
        assert!((m.min_prompt_logits_cos - 1.0).abs() < 1e-12);
        assert!(m
            .gate(0.1, 0.999)
            .detail
            .contains("prompt: top-1 2/2 firm positions"));

        // Another top-1 at the near tie (position 1) is allowed; at position 2 it fails,
        // though every generated step agrees.
        let mut e = decode(&[0], &rows);
        e.prompt_logits[1] = vec![1.9, 2.0, 0.0];
        assert!(compare(&e, Some(&rows)).unwrap().passed(0.0));
        e.prompt_logits[2] = vec![0.0, 3.1, 3.0];
        let m = compare(&e, Some(&rows)).unwrap();
        assert!(!m.passed(0.0));
        assert_eq!(m.min_prompt_logits_cos_position, 2);
        let g = m.gate(0.1, 0.0);
        assert!(!g.passed);
        assert!(
            g.detail
                .starts_with("prompt position 2: engine top-1 1, reference 2"),
            "{}",
            g.detail
        );

        // A prompt of another length is an error.
        e.prompt_logits.pop();
        assert!(compare(&e, Some(&rows)).is_err());
    }
}
