//! The export crate's error type: every variant names the file, folder or option at
//! fault, on one line.

use q3vl_model::error::printable;
use std::path::PathBuf;

/// Errors from exporting a bundle pair.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The bundles could not be opened, read or checked, or the output not written
    /// (the bundle crate's errors name the file or tensor).
    #[error(transparent)]
    Bundle(#[from] q3vl_bundle::BundleError),
    /// The bundle pair is not verified (no stamp, or one that no longer matches its
    /// bytes) and `--allow-unverified` was not given.
    #[error("{}: {}; run `q3vl verify --bundle … --stamp` first, or pass --allow-unverified", printable(.path.display()), printable(.why))]
    Unverified {
        /// The language bundle folder.
        path: PathBuf,
        /// What the stamp check found.
        why: String,
    },
    /// The bundles cannot be exported in this format (an fp16 bundle to an int8
    /// format, a tensor the format cannot carry).
    #[error("{}: {}", printable(.path.display()), printable(.msg))]
    Unsupported {
        /// The bundle folder or file at fault.
        path: PathBuf,
        /// Why.
        msg: String,
    },
    /// The output folder exists and `--force` was not given, or it is not a q3vl
    /// export of this format (never replaced, even with `--force`).
    #[error("{}: {}", printable(.path.display()), printable(.msg))]
    Output {
        /// The output folder.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", printable(.path.display()))]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The run was interrupted (Ctrl-C, SIGTERM); nothing was installed.
    #[error("interrupted; nothing was written")]
    Interrupted,
}

impl ExportError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ExportError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, ExportError>;
