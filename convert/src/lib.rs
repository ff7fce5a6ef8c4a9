//! q3vl-convert: Qwen3-VL checkpoints in, q3vl bundles out.
//!
//! - [`fetch`]: download a checkpoint from the Hugging Face hub into the standard
//!   cache, verifying sizes and sha256 against what the hub reports.
//! - [`quantize`]: the int8 per-block-32 arithmetic (`docs/quantization.md`).
//! - [`convert()`]: the streaming converter (bounded memory, byte-reproducible).
//! - [`synth`]: random checkpoints of the real shapes, for scale tests and benchmarks.

#![warn(missing_docs)]

pub mod cancel;
mod convert;
pub mod error;
pub mod fetch;
pub mod half_store;
pub mod plan;
pub mod progress;
pub mod quantize;
pub mod source;
mod stream;
pub mod synth;
pub mod tokenizer_files;
pub mod vision_meta;

pub use cancel::Cancel;
pub use convert::{
    convert, BundleReport, ClassReport, ConvertOptions, ConvertSummary, SourceReport,
};
pub use error::{ConvertError, Result};
pub use progress::{Progress, Quiet};
