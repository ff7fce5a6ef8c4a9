//! The bundle crate's error type: every variant names the file or tensor at fault.

use q3vl_model::error::printable;
use std::path::PathBuf;

/// Errors from reading or writing a bundle.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The folder is not a q3vl bundle, or one of a format version this build does not read.
    #[error("{}: {}", printable(.path.display()), printable(.msg))]
    Format {
        /// The bundle folder or its metadata file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A file's size differs from the one recorded in `metadata.json`.
    #[error("{}: size {found} bytes, metadata.json says {expected}", printable(.path.display()))]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// Size recorded at conversion time.
        expected: u64,
        /// Size on disk.
        found: u64,
    },
    /// A file's sha256 differs from the one recorded in `metadata.json`.
    #[error("{}: sha256 {found}, metadata.json says {}", printable(.path.display()), printable(.expected))]
    ChecksumMismatch {
        /// The file.
        path: PathBuf,
        /// Digest recorded at conversion time.
        expected: String,
        /// Digest of the file on disk.
        found: String,
    },
    /// A tensor is not in the bundle.
    #[error("tensor {}: not in bundle {}", printable(.name), printable(.bundle.display()))]
    MissingTensor {
        /// The tensor name.
        name: String,
        /// The bundle folder.
        bundle: PathBuf,
    },
    /// A tensor's dtype or shape is not what its role requires.
    #[error("tensor {}: {}", printable(.name), printable(.msg))]
    Tensor {
        /// The tensor name.
        name: String,
        /// What is wrong.
        msg: String,
    },
    /// A file could not be read, written, synced or renamed, a JSON file of the bundle
    /// is malformed or lacks a field, or the weights could not be read (damaged
    /// safetensors file, bad index): the model crate's errors, which say it the same way.
    #[error(transparent)]
    Model(#[from] q3vl_model::Error),
    /// A bundle already exists where one would be written.
    #[error("{}: a bundle already exists here (pass --force to replace it)", printable(.path.display()))]
    Exists {
        /// The existing folder.
        path: PathBuf,
    },
    /// Another q3vl run holds the lock this run needs on a folder.
    #[error("{}: {holder} (lock file {}); try again when it has finished", printable(.path.display()), printable(.lock.display()))]
    Locked {
        /// The folder the run was given (`--out` or `--bundle`'s output folder).
        path: PathBuf,
        /// The lock file held.
        lock: PathBuf,
        /// What holds it.
        holder: LockHolder,
    },
    /// A writer was fed bytes that do not fit its plan (a converter bug, reported, not panicked).
    #[error("{}: {}", printable(.path.display()), printable(.msg))]
    Write {
        /// The file being written.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
}

/// What holds a lock a run could not take (see [`crate::Staging`] and
/// [`crate::ReadClaim`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockHolder {
    /// A `q3vl convert` writing bundles into the folder.
    Conversion,
    /// A `q3vl synth` or `q3vl export` writing the folder (a claim on one entry).
    Synth,
    /// One or more `q3vl run`, `verify`, `bench` or `export` reading the folder's bundles.
    Readers,
}

impl std::fmt::Display for LockHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LockHolder::Conversion => "another q3vl conversion is writing into this folder",
            LockHolder::Synth => "another q3vl synth or export is writing this folder",
            LockHolder::Readers => {
                "a q3vl run, verify, bench or export is reading the bundles in this folder"
            }
        })
    }
}

impl BundleError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        q3vl_model::Error::io(path, source).into()
    }

    /// A malformed JSON file of the bundle, or one that lacks a field.
    pub fn json(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        q3vl_model::Error::Json {
            path: path.into(),
            msg: msg.into(),
        }
        .into()
    }
}
