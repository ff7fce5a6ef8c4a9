//! The converter's error type: every variant names the file, tensor or option at fault.

use q3vl_model::error::printable;
use std::path::PathBuf;

/// Errors from fetching, converting or synthesizing a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The source checkpoint could not be read (missing or damaged file, bad config,
    /// missing tensor, wrong shape or dtype, non-finite value), or a file could not be
    /// read or written: the model crate's errors, which say it the same way.
    #[error(transparent)]
    Model(#[from] q3vl_model::Error),
    /// A bundle could not be written (or an existing one is in the way).
    #[error(transparent)]
    Bundle(#[from] q3vl_bundle::BundleError),
    /// An input file is unusable for a reason other than I/O.
    #[error("{}: {}", printable(.path.display()), printable(.msg))]
    Input {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A weight to be quantized has in-features that are not a multiple of 32.
    #[error("tensor {}: in-features {cols} is not a multiple of 32, so it cannot be stored int8 per-block-32 (pass --fallback-f16 to keep it f16)", printable(.name))]
    NotMultipleOf32 {
        /// The tensor.
        name: String,
        /// Its in-features.
        cols: usize,
    },
    /// A tensor is not part of the Qwen3-VL layout.
    #[error("tensor {} in {}: not part of the Qwen3-VL layout for this config", printable(.name), printable(.file.display()))]
    UnexpectedTensor {
        /// The tensor.
        name: String,
        /// The file holding it.
        file: PathBuf,
    },
    /// A value cannot be stored as f16.
    #[error("tensor {}: value {value} at flat index {index} overflows f16 (|x| > 65504)", printable(.name))]
    F16Overflow {
        /// The tensor.
        name: String,
        /// First bad flat index.
        index: usize,
        /// The value.
        value: f32,
    },
    /// A block's scale does not fit f16 (a weight magnitude above ~8.3e6).
    #[error("tensor {}: the int8 scale of row {row}, block {block} overflows f16", printable(.name))]
    ScaleOverflow {
        /// The tensor.
        name: String,
        /// The row.
        row: usize,
        /// The 32-column block.
        block: usize,
    },
    /// A Hugging Face repository id that the hub cannot name.
    #[error("hf id {id:?}: {msg}")]
    RepoId {
        /// The id as given.
        id: String,
        /// Which rule it breaks.
        msg: String,
    },
    /// The hub refused or failed a request.
    #[error("{url}: {msg}")]
    Hub {
        /// The request.
        url: String,
        /// What went wrong.
        msg: String,
    },
    /// A downloaded file does not match what the hub says it is.
    #[error("{file}: {msg} (the bad copy was removed; run again to download it afresh)")]
    Integrity {
        /// The file (repo-relative name).
        file: String,
        /// What differs.
        msg: String,
    },
    /// The user interrupted the run (Ctrl-C); nothing was left behind.
    #[error("interrupted; no bundle was written")]
    Interrupted,
}

impl ConvertError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        q3vl_model::Error::io(path, source).into()
    }

    /// An unusable input file.
    pub fn input(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        ConvertError::Input {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, ConvertError>;
