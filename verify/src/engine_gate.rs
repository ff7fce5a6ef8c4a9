//! The engine ≡ reference gate. The engine decodes greedily on exactly the trace's
//! inputs (its prompt ids, its pixel values and grid), keeping the logits of every
//! step. The reference then runs once, teacher-forced along the engine's tokens, on
//! the same bundle's dequantized weights. At every step both have seen the same
//! prefix, so "the engine's token is the reference's top-1 at every step" is, by
//! induction, "the two greedy decodes are equal", and the per-step logits cosine
//! compares like with like. The count stops at the first step where the reference's
//! own top-2 margin is below the firm margin; a count of zero fails.
//!
//! The prompt is compared too, position by position: the engine scores it in one
//! prefill ([`Engine::prompt_logits`]) and the reference's prompt logits are its
//! `logits` tap. Every firm position's top-1 must agree, and the smallest logits
//! cosine is reported (a fault in the prefill's other rows reaches the generated
//! tokens only through the cache, and may not show there).

use crate::compare::cosine;
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

/// Runs `engine` greedily for `steps` tokens on prompt `ids` and, for image prompts,
/// model-ready patch rows `[P, C·T·p·p]` (flattened) with their grid.
pub fn run_engine(
    engine: &Engine,
    ids: &[u32],
    image: Option<(&[f32], [usize; 3])>,
    steps: usize,
) -> Result<EngineDecode> {
    let features = match image {
        Some((pv, grid)) => Some(engine.encode_image(pv, grid)?),
        None => None,
    };
    let params = GenerateParams {
        max_new_tokens: steps,
        temperature: 0.0,
        ignore_eos: true,
        keep_logits: true,
        ..GenerateParams::default()
    };
    let g = engine.generate(ids, features.as_ref(), &params, &mut |_| {})?;
    let prompt_logits = engine.prompt_logits(ids, features.as_ref())?;
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
    /// Cosine (float64) of the engine's and the reference's logits at each step.
    pub logits_cos: Vec<f64>,
    /// The smallest of them (1 when no step ran).
    pub min_logits_cos: f64,
    /// Where it is.
    pub min_logits_cos_step: usize,
    /// Tokens compared, counted up to the first ambiguous reference step (the gate).
    pub count: DecodeMatch,
    /// Every firm step, past the count's stop too: with the reference forced along
    /// the engine's tokens both always see the same prefix (reported, not gated).
    pub forced: Top1Sweep,
    /// Cosine (float64) of the engine's and the reference's logits at each prompt
    /// position.
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
        let (mut reference_tokens, mut reference_margins, mut logits_cos) = (
            Vec::with_capacity(steps),
            Vec::with_capacity(steps),
            Vec::with_capacity(steps),
        );
        for (k, (e, r)) in engine.logits.iter().zip(&rows).enumerate() {
            if e.len() != r.len() {
                return Err(bad(format!(
                    "engine ≡ reference: step {k} has {} engine logits and {} reference logits",
                    e.len(),
                    r.len()
                )));
            }
            let (t, m) = top2(r);
            reference_tokens.push(t);
            reference_margins.push(m);
            logits_cos.push(cosine(e, r));
        }
        let (min_logits_cos_step, min_logits_cos) = logits_cos
            .iter()
            .copied()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or((0, 1.0));
        let count = decode_match(
            &engine.tokens,
            &reference_tokens,
            &reference_margins,
            firm,
            steps,
        );
        let forced = top1_sweep(&engine.tokens, &reference_tokens, &reference_margins, firm);

        let prompt_rows = reference_prompt.to_vec2::<f32>()?;
        if prompt_rows.len() != engine.prompt_logits.len() {
            return Err(bad(format!(
                "engine ≡ reference: the engine scored {} prompt positions, the reference {}",
                engine.prompt_logits.len(),
                prompt_rows.len()
            )));
        }
        let (mut engine_top1, mut reference_top1, mut prompt_margins, mut prompt_logits_cos) =
            (vec![], vec![], vec![], vec![]);
        for (i, (e, r)) in engine.prompt_logits.iter().zip(&prompt_rows).enumerate() {
            if e.len() != r.len() {
                return Err(bad(format!(
                    "engine ≡ reference: prompt position {i} has {} engine logits and {} reference logits",
                    e.len(),
                    r.len()
                )));
            }
            let (t, m) = top2(r);
            engine_top1.push(top2(e).0);
            reference_top1.push(t);
            prompt_margins.push(m);
            prompt_logits_cos.push(cosine(e, r));
        }
        let (min_prompt_logits_cos_position, min_prompt_logits_cos) = prompt_logits_cos
            .iter()
            .copied()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or((0, 1.0));
        let prompt = top1_sweep(&engine_top1, &reference_top1, &prompt_margins, firm);
        Ok(EngineMatch {
            prompt_logits_cos,
            min_prompt_logits_cos,
            min_prompt_logits_cos_position,
            prompt,
            steps,
            count,
            forced,
            engine_tokens: engine.tokens.clone(),
            reference_tokens,
            reference_margins,
            logits_cos,
            min_logits_cos,
            min_logits_cos_step,
        })
    }

    /// Whether the gate passes: at least one step counted, every counted step equal,
    /// and every firm prompt position's top-1 equal.
    pub fn passed(&self) -> bool {
        self.count.counted > 0 && self.count.passed() && self.prompt.mismatches.is_empty()
    }

    /// The gate's result line.
    pub fn gate(&self, firm: f64) -> GateResult {
        let c = &self.count;
        let p = &self.prompt;
        let cos = format!(
            "min logits cos {:.7} at step {}; prompt: top-1 {}/{} firm positions, min logits cos {:.7} at position {}",
            self.min_logits_cos,
            self.min_logits_cos_step,
            p.agree,
            p.firm,
            self.min_prompt_logits_cos,
            self.min_prompt_logits_cos_position
        );
        let stop = match c.first_ambiguous {
            Some(a) => format!(
                "count stops at ambiguous reference step {a} (margin {:.3})",
                self.reference_margins[a]
            ),
            None => "no ambiguous reference step".into(),
        };
        let detail = match (c.first_mismatch, p.mismatches.first()) {
            (Some(i), _) => format!(
                "step {i}: engine {}, reference {} (margin {:.3}); {cos}",
                self.engine_tokens[i], self.reference_tokens[i], self.reference_margins[i]
            ),
            (None, Some(&(i, e, r))) => {
                format!("prompt position {i}: engine top-1 {e}, reference {r}; {cos}")
            }
            (None, None) if c.counted == 0 => format!("nothing counted: {stop}; {cos}"),
            (None, None) => format!("{stop}; {cos}"),
        };
        GateResult::new(
            GATE,
            self.passed(),
            format!("{}/{}", c.matched, c.counted),
            format!(
                "{} greedy steps equal, counted to the first reference margin < {firm}",
                self.steps
            ),
            detail,
        )
    }
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
        assert!(m.passed());
        assert_eq!((m.count.counted, m.count.matched), (3, 3));
        assert_eq!(m.min_logits_cos_step, 1);
        assert!(m.min_logits_cos < 0.99 && (m.logits_cos[0] - 1.0).abs() < 1e-12);
        assert_eq!(m.gate(0.1).value, "3/3");
    }

    #[test]
    fn a_different_token_at_a_firm_step_fails_there() {
        let rows = [[3.0, 0.0, 1.0], [0.0, 2.0, 1.0]];
        let e = decode(&[0, 2], &[[3.0, 0.0, 1.0], [0.0, 1.0, 2.0]]);
        let m = compare(&e, Some(&rows)).unwrap();
        assert!(!m.passed());
        assert_eq!(m.count.first_mismatch, Some(1));
        let g = m.gate(0.1);
        assert!(!g.passed && g.detail.starts_with("step 1: engine 2, reference 1"));
    }

    #[test]
    fn the_count_stops_at_an_ambiguous_reference_step_and_zero_counted_fails() {
        // Step 1 is a near tie in the reference: the engine may choose either, and
        // what follows is no longer counted.
        let rows = [[3.0, 0.0, 1.0], [0.0, 2.0, 1.95], [5.0, 0.0, 0.0]];
        let e = decode(&[0, 2, 1], &rows);
        let m = compare(&e, Some(&rows)).unwrap();
        assert!(m.passed());
        assert_eq!((m.count.counted, m.count.first_ambiguous), (1, Some(1)));
        assert!(m.gate(0.1).detail.contains("ambiguous reference step 1"));

        let rows = [[1.0, 1.05, 0.0]];
        let e = decode(&[1], &rows);
        let m = compare(&e, Some(&rows)).unwrap();
        assert!(!m.passed());
        assert!(m.gate(0.1).detail.starts_with("nothing counted"));

        let m = compare(&decode(&[], &[]), None).unwrap();
        assert!(!m.passed());
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
        assert!(m.passed());
        assert_eq!((m.prompt.firm, m.prompt.agree), (2, 2));
        assert!((m.min_prompt_logits_cos - 1.0).abs() < 1e-12);
        assert!(m
            .gate(0.1)
            .detail
            .contains("prompt: top-1 2/2 firm positions"));

        // Another top-1 at the near tie (position 1) is allowed; at position 2 it fails,
        // though every generated step agrees.
        let mut e = decode(&[0], &rows);
        e.prompt_logits[1] = vec![1.9, 2.0, 0.0];
        assert!(compare(&e, Some(&rows)).unwrap().passed());
        e.prompt_logits[2] = vec![0.0, 3.1, 3.0];
        let m = compare(&e, Some(&rows)).unwrap();
        assert!(!m.passed());
        assert_eq!(m.min_prompt_logits_cos_position, 2);
        let g = m.gate(0.1);
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
