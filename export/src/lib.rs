//! Exports of verified q3vl bundles to other runtimes' formats.
//!
//! q3vl proves its int8 weights against the fp32 Hugging Face model; an export hands
//! those same weights, unchanged wherever the format allows, to a runtime q3vl does not
//! replace. Each export reads a bundle pair only when its verification stamps hold
//! ([`source`]), records where its weights came from and what they were verified
//! against (`q3vl_export.json`), streams with bounded memory, and appears under its
//! name only when complete ([`output`]).
//!
//! - [`compressed_tensors`]: an HF checkpoint in the compressed-tensors
//!   `pack-quantized` format, for HF transformers and vLLM (`docs/export.md`).
//! - [`gguf`]: the text model and vision projector GGUF files llama.cpp runs, the int8
//!   weights as Q8_0 blocks without re-quantizing.

#![warn(missing_docs)]

pub mod compressed_tensors;
mod error;
pub mod gguf;
pub mod output;
mod small_files;
pub mod source;

pub use error::{ExportError, Result};
pub use source::{Provenance, Verification, PROVENANCE_FILE};

use q3vl_bundle::Producer;
use q3vl_convert::cancel::Cancel;
use std::path::PathBuf;

/// What to export and where: the part every format shares.
#[derive(Debug, Clone)]
pub struct Request {
    /// A conversion's output folder, or its language bundle folder.
    pub bundle: PathBuf,
    /// The export folder to create.
    pub out: PathBuf,
    /// Replace an existing export of the same format in `out` (never another folder).
    pub force: bool,
    /// Export a pair without a valid verification stamp (its files are still checked).
    pub allow_unverified: bool,
    /// The q3vl build writing the export (recorded in its provenance).
    pub producer: Producer,
}

/// `Err(Interrupted)` once Ctrl-C (or SIGTERM, SIGHUP) was caught: long loops poll it.
pub fn check_cancel(cancel: &Cancel) -> Result<()> {
    if cancel.is_cancelled() {
        Err(ExportError::Interrupted)
    } else {
        Ok(())
    }
}
