//! Errors of the verifier: all of them are bad input (exit 2), never a failed gate.

use q3vl_model::error::printable;
use std::path::PathBuf;

/// Why a trace, gates file or model could not be verified at all.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The trace file is unreadable or not a `qwen3vl-oracle-trace/1` file.
    #[error("trace {}: {}", printable(.path.display()), printable(.msg))]
    Trace {
        /// The trace.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The trace does not fit the model it is compared with.
    #[error("trace {} does not fit the model: {}", printable(.path.display()), printable(.msg))]
    Mismatch {
        /// The trace.
        path: PathBuf,
        /// What differs.
        msg: String,
    },
    /// The gates file is malformed.
    #[error("gates file {}: {}", printable(.path.display()), printable(.msg))]
    Gates {
        /// The gates file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The model side failed (config, weights, image, tokenizer).
    #[error(transparent)]
    Model(#[from] q3vl_model::Error),
    /// The engine could not open or run the bundle (engine ≡ reference gate).
    #[error("engine: {0}")]
    Engine(#[from] q3vl_engine::EngineError),
    /// A bundle could not be read, checked or stamped.
    #[error(transparent)]
    Bundle(#[from] q3vl_bundle::BundleError),
    /// Writing a report failed.
    #[error("{}: {source}", printable(.path.display()))]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file or folder given as an argument of `q3vl verify` could not be used
    /// (`--bundle` opened, `--report` or `--junit` written).
    #[error("{arg} {}: {source}", .path.display())]
    Arg {
        /// The argument, as the command line names it.
        arg: &'static str,
        /// Its value.
        path: PathBuf,
        /// What went wrong.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A GGUF file (`--gguf`, `--mmproj`) that cannot be read as a Qwen3-VL model.
    #[error(transparent)]
    Gguf(#[from] q3vl_gguf::GgufError),
    /// A bundle folder holds a file its `metadata.json` does not list: it would be
    /// stamped without a checksum or a gate having looked at it.
    #[error("{}: {} is not listed in its metadata.json (remove it, or convert again)", .dir.display(), .file)]
    Unlisted {
        /// The bundle folder.
        dir: PathBuf,
        /// The file.
        file: String,
    },
    /// A bundle changed between its checks and its stamp.
    #[error("{}: {why} (it changed while the gates ran); not stamped", .dir.display())]
    Changed {
        /// The bundle folder.
        dir: PathBuf,
        /// The first difference.
        why: String,
    },
    /// A run that cannot stamp was asked to.
    #[error("cannot stamp: {why}")]
    Unstampable {
        /// Why not.
        why: String,
    },
}

impl From<candle_core::Error> for VerifyError {
    fn from(e: candle_core::Error) -> Self {
        VerifyError::Model(q3vl_model::Error::Candle(e))
    }
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, VerifyError>;
