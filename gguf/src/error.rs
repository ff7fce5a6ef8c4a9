//! What reading a GGUF pair can fail with: always the file and the fault, in one line.

use std::path::PathBuf;

/// A GGUF file that cannot be read as (half of) a Qwen3-VL model.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file is not a well-formed GGUF, or not one this model can come from.
    #[error("{path}: {msg}")]
    File {
        /// The file.
        path: PathBuf,
        /// The fault.
        msg: String,
    },
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// A result of this crate.
pub type Result<T> = std::result::Result<T, GgufError>;
