//! Gate thresholds (a versioned JSON file, `gates/default.json` built in) and gate results.

use crate::error::{Result, VerifyError};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The built-in gates file.
pub const DEFAULT_GATES: &str = include_str!("../gates/default.json");

/// Thresholds of the fp32 ladder (reference on the original checkpoint).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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
}

/// Thresholds of the quantized ladder (reference on a bundle's weights).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BundleGates {
    /// Merger and DeepStack outputs.
    pub vision_cos: f64,
    /// Every decoder layer's output (flattened).
    pub layer_cos: f64,
    /// Free-running greedy steps that must match the oracle.
    pub free_decode_steps: usize,
    /// Engine ≡ reference: greedy steps of the engine that must equal the reference's
    /// on the bundle's weights (0 = as many as the trace's decode).
    pub engine_steps: usize,
}

/// A whole gates file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Gates {
    /// `q3vl-gates/1`.
    pub format: String,
    /// Version of the thresholds, recorded in reports and stamps.
    pub version: u32,
    /// Free text.
    #[serde(default)]
    pub notes: String,
    /// Oracle top-1 minus top-2 below this is ambiguous: reported, never gated.
    pub firm_margin: f64,
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
        let g: Gates = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if g.format != "q3vl-gates/1" {
            return Err(bad(format!(
                "format {:?} is not \"q3vl-gates/1\"",
                g.format
            )));
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_gates_parse() {
        let g = Gates::builtin();
        assert_eq!(g.fp32.stage_cos, 0.99999);
        assert_eq!(g.bundle.vision_cos, 0.9997);
        assert_eq!(g.firm_margin, 0.1);
        assert_eq!(g.bundle.engine_steps, 24);
    }
}
