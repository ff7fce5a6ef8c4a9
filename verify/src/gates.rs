//! Gate thresholds (a versioned JSON file, `gates/default.json` built in) and gate results.

use crate::error::{Result, VerifyError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The built-in gates file.
pub const DEFAULT_GATES: &str = include_str!("../gates/default.json");

/// The format tag of a gates file.
pub const GATES_FORMAT: &str = "q3vl-gates/2";

/// Thresholds of the fp32 ladder (reference on the original checkpoint).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Fp32Gates {
    /// Cosine of every stage's flattened output.
    pub stage_cos: f64,
    /// Smallest per-token cosine of every stage.
    pub token_cos_min: f64,
    /// Cosine of every block's / layer's update.
    pub update_cos: f64,
    /// Largest |pixel difference| when the image needed no resize.
    pub pixel_max_abs: f64,
    /// Greedy steps to reproduce (0 = all the trace has).
    pub decode_steps: usize,
    /// Largest KL(oracle ‖ reference) at any scored position.
    pub kld_max: f64,
}

/// The thresholds that depend on the conversion mode.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModeGates {
    /// Merger and DeepStack outputs.
    pub vision_cos: f64,
    /// Decoder layer `i`'s output (flattened) must have `1 − cos ≤ (i + 1) · layer_gap`:
    /// each layer adds its own rounding error to the stream, so the gap grows with
    /// depth. The last layer's bound sets the upstream part of the noise allowance.
    pub layer_gap: f64,
    /// Every decoder layer replayed on the oracle's own input: the relative error
    /// `|ours − oracle| / |oracle update|` of its update (`text.local`).
    pub local_update_rel: f64,
    /// The cosine every layer must reach however deep: the linear bound of a coarse
    /// type (4 or 5 bits) would otherwise fall to nothing on a 36-layer model.
    #[serde(default)]
    pub layer_floor: f64,
}

impl ModeGates {
    /// The cosine decoder layer `i` (0-based) must reach.
    pub fn layer_cos(&self, i: usize) -> f64 {
        (1.0 - (i + 1) as f64 * self.layer_gap).max(self.layer_floor)
    }
}

/// Thresholds of the quantized ladder (reference on a bundle's weights).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BundleGates {
    /// Free-running greedy steps that must match the oracle.
    pub free_decode_steps: usize,
    /// Engine ≡ reference: greedy steps of the engine compared with the reference's
    /// on the bundle's weights (0 = as many as the trace's decode).
    pub engine_steps: usize,
    /// Engine ≡ reference: smallest centered logits cosine at any step or prompt
    /// position.
    pub engine_logits_cos: f64,
    /// The measured logit noise may be this many times the allowance.
    pub noise_factor: f64,
    /// The mean KL divergence may be this many times ½ · mean(allowed σ²).
    pub kld_factor: f64,
    /// The head on the oracle's own normed state may be this many times noisier than
    /// its rounding allows (`head.local`).
    pub head_factor: f64,
    /// The final norm on the oracle's own last hidden state: largest relative error
    /// (`norm.local`; its weight is stored f32 in every mode, so only float rounding).
    pub norm_local_rel: f64,
    /// Per conversion mode (`int8hu`, `int8lin`, `fp16`).
    pub modes: BTreeMap<String, ModeGates>,
}

impl BundleGates {
    /// The thresholds of `mode`; a bundle that does not record its mode is held to
    /// the loosest (`int8hu`) ones, and the report says which applied.
    pub fn mode(&self, mode: Option<&str>) -> Result<(&str, &ModeGates)> {
        let name = mode.unwrap_or("int8hu");
        self.modes
            .get_key_value(name)
            .map(|(k, v)| (k.as_str(), v))
            .ok_or_else(|| VerifyError::Gates {
                path: "gates".into(),
                msg: format!("no thresholds for mode {name:?} under bundle.modes"),
            })
    }
}

/// A whole gates file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Gates {
    /// [`GATES_FORMAT`].
    pub format: String,
    /// Version of the thresholds, recorded in reports and stamps.
    pub version: u32,
    /// Free text.
    #[serde(default)]
    pub notes: String,
    /// How the thresholds follow from the quantization arithmetic.
    #[serde(default)]
    pub derivation: Vec<String>,
    /// The smallest oracle top-1 minus top-2 margin that is ever firm.
    pub firm_margin: f64,
    /// Firm also needs margin ≥ noise_z · √2 · the measured logit noise.
    pub noise_z: f64,
    /// fp32 ladder thresholds.
    pub fp32: Fp32Gates,
    /// Quantized ladder thresholds.
    pub bundle: BundleGates,
}

impl Gates {
    /// The built-in thresholds.
    pub fn builtin() -> Self {
        serde_json::from_str(DEFAULT_GATES).expect("gates/default.json is valid")
    }

    /// Reads a gates file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bad = |msg: String| VerifyError::Gates {
            path: path.to_path_buf(),
            msg,
        };
        let text =
            q3vl_model::input::read_regular_to_string(path).map_err(|e| bad(e.to_string()))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        match v.get("format").and_then(|f| f.as_str()) {
            Some(GATES_FORMAT) => {}
            other => {
                return Err(bad(format!(
                "format {other:?} is not {GATES_FORMAT:?} (start from verify/gates/default.json)"
            )))
            }
        }
        let g: Gates = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
        let all = [
            g.firm_margin,
            g.noise_z,
            g.bundle.noise_factor,
            g.bundle.kld_factor,
        ];
        let modes = g.bundle.modes.values();
        let per_mode =
            modes.flat_map(|m| [m.vision_cos, m.layer_gap, m.local_update_rel, m.layer_floor]);
        if all
            .into_iter()
            .chain(per_mode)
            .any(|x| !x.is_finite() || x < 0.0)
        {
            return Err(bad("every threshold must be finite and ≥ 0".into()));
        }
        Ok(g)
    }
}

/// The outcome of one gate on one trace.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GateResult {
    /// Stable name, e.g. `text.ladder`, `decode.greedy`.
    pub name: String,
    /// Whether it passed.
    pub passed: bool,
    /// The measured figure, as a person reads it (`0.9999987`, `24/24`).
    pub value: String,
    /// What it was held against.
    pub threshold: String,
    /// Where and why, in one line.
    pub detail: String,
    /// Why the gate had nothing to count, when it had nothing (then `passed` is true:
    /// it did not fail, but reports show it as skipped, never as passed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// `pass`, `FAIL` or `skip`: what a reader of `report.json` or a stamp should
    /// show (`passed` alone is also true for a skipped gate).
    pub verdict: String,
}

impl GateResult {
    /// A gate result.
    pub fn new(
        name: &str,
        passed: bool,
        value: impl Into<String>,
        threshold: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        GateResult {
            name: name.into(),
            passed,
            value: value.into(),
            threshold: threshold.into(),
            detail: detail.into(),
            skipped: None,
            verdict: if passed { "pass" } else { "FAIL" }.into(),
        }
    }

    /// A gate that had nothing to count, and says why.
    pub fn skipped(
        name: &str,
        value: impl Into<String>,
        threshold: impl Into<String>,
        why: impl Into<String>,
    ) -> Self {
        let why = why.into();
        GateResult {
            skipped: Some(why.clone()),
            verdict: "skip".into(),
            ..GateResult::new(name, true, value, threshold, why)
        }
    }

    /// `pass`, `FAIL` or `skip`.
    pub fn verdict(&self) -> &str {
        &self.verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_gates_parse() {
        let g = Gates::builtin();
        assert_eq!(g.fp32.stage_cos, 0.99999);
        assert_eq!(g.bundle.mode(Some("int8hu")).unwrap().1.vision_cos, 0.9997);
        assert_eq!(g.bundle.mode(None).unwrap().0, "int8hu");
        assert!(g.bundle.mode(Some("int4")).is_err());
        assert_eq!(g.firm_margin, 0.1);
        assert_eq!(g.bundle.engine_steps, 24);
    }
}
