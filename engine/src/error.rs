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
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, EngineError>;
