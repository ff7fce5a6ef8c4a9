//! The engine's error type: every variant says what is at fault in one line.

use std::path::PathBuf;

/// Errors from opening bundles or running the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A bundle could not be opened, or failed its checks.
    #[error(transparent)]
    Bundle(#[from] q3vl_bundle::BundleError),
    /// Preprocessing, tokenisation or a config file failed (model crate).
    #[error(transparent)]
    Model(#[from] q3vl_model::Error),
    /// The language and vision bundles do not belong together, or a bundle's
    /// tensors do not fit its config.
    #[error("{path}: {msg}")]
    Mismatch {
        /// The bundle folder at fault.
        path: PathBuf,
        /// What does not fit.
        msg: String,
    },
    /// A tensor is missing or stored in a way the engine cannot use.
    #[error("tensor {name}: {msg}")]
    Tensor {
        /// The tensor name.
        name: String,
        /// What is wrong.
        msg: String,
    },
    /// Bad input to generation: ids, image features, prompt length.
    #[error("{0}")]
    Input(String),
    /// The logits stopped being finite: the weights or config hold a value that
    /// turned the computation into NaN or infinity. Generation stops instead of
    /// sampling garbage.
    #[error("the logits are not finite at {at} (logit {index} is {value}): the bundle's weights or config are damaged")]
    NonFinite {
        /// Where: `prompt position N` or `generated token N`.
        at: String,
        /// The first bad logit (a vocabulary id).
        index: usize,
        /// Its value.
        value: f32,
    },
}

/// `Err(NonFinite)` at the first non-finite value of `logits` (`[rows, vocab]`), with
/// `at(row)` saying where that row is.
pub fn check_logits(logits: &[f32], vocab: usize, at: impl Fn(usize) -> String) -> Result<()> {
    match logits.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => Err(EngineError::NonFinite {
            at: at(i / vocab.max(1)),
            index: i % vocab.max(1),
            value: logits[i],
        }),
    }
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, EngineError>;
