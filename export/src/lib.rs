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

#![warn(missing_docs)]

pub mod compressed_tensors;
mod error;
pub mod output;
pub mod source;

pub use error::{ExportError, Result};
pub use source::{Provenance, Verification, PROVENANCE_FILE};
