//! What Qwen3-VL is: configuration, checkpoint loading, the HF tensor layout, prompt
//! and image preprocessing, and the fp32 reference forward passes with their taps.
//!
//! The reference follows `docs/qwen3-vl-reference.md` op by op; the
//! names in this crate are that document's names.

pub mod config;
pub mod conversation;
pub mod error;
pub mod image;
pub mod input;
pub mod layout;
pub mod ops;
pub mod prompt;
pub mod reference;
pub mod rope;
pub mod shipped;
pub mod source;
pub mod taps;
pub mod text;
pub mod vision;
pub mod weights;

pub use config::{PreprocessorConfig, Qwen3VlConfig, Size, TextConfig, VisionConfig};
pub use error::{Error, Result};
pub use source::WeightSource;
pub use weights::Checkpoint;
