//! The bundle crate's error type: every variant names the file or tensor at fault.

use std::path::PathBuf;

/// Errors from reading or writing a bundle.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// A file could not be read, written, synced or renamed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A JSON file of the bundle is malformed or lacks a field.
    #[error("{path}: {msg}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The folder is not a q3vl bundle, or one of a format version this build does not read.
    #[error("{path}: {msg}")]
    Format {
        /// The bundle folder or its metadata file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A file's size differs from the one recorded in `metadata.json`.
    #[error("{path}: size {found} bytes, metadata.json says {expected}")]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// Size recorded at conversion time.
        expected: u64,
        /// Size on disk.
        found: u64,
    },
    /// A file's sha256 differs from the one recorded in `metadata.json`.
    #[error("{path}: sha256 {found}, metadata.json says {expected}")]
    ChecksumMismatch {
        /// The file.
        path: PathBuf,
        /// Digest recorded at conversion time.
        expected: String,
        /// Digest of the file on disk.
        found: String,
    },
    /// A tensor is not in the bundle.
    #[error("tensor {name}: not in bundle {bundle}")]
    MissingTensor {
        /// The tensor name.
        name: String,
        /// The bundle folder.
        bundle: PathBuf,
    },
    /// A tensor's dtype or shape is not what its role requires.
    #[error("tensor {name}: {msg}")]
    Tensor {
        /// The tensor name.
        name: String,
        /// What is wrong.
        msg: String,
    },
    /// The weights could not be read (damaged safetensors file, bad index).
    #[error(transparent)]
    Weights(#[from] q3vl_model::Error),
    /// A bundle already exists where one would be written.
    #[error("{path}: a bundle already exists here (pass --force to replace it)")]
    Exists {
        /// The existing folder.
        path: PathBuf,
    },
    /// A writer was fed bytes that do not fit its plan (a converter bug, reported, not panicked).
    #[error("{path}: {msg}")]
    Write {
        /// The file being written.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
}

impl BundleError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        BundleError::Io {
            path: path.into(),
            source,
        }
    }
}
