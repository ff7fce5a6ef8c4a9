//! q3vl-engine: the runtime behind `q3vl run` and `q3vl bench`.
//!
//! - Both bundles are memory-mapped ([`q3vl_bundle::Bundles`]); nothing large is
//!   copied or widened up front.
//! - Decoder: int8 per-block-32 weights used as int8 ([`q3vl_kernels`]), f16 weights
//!   where the mode keeps them. Activations are rounded per block of 32 to int16 for
//!   every int8 product. Prefill pushes all prompt tokens through each weight at once
//!   (a packed int8 × int16 GEMM, output columns split across threads); decode
//!   streams each weight once (a matrix-vector kernel, rows split across threads).
//! - Vision: f16 weights widened tile by tile inside a packed f32 GEMM.
//! - Image tokens use the id-space trick ([`positions`]): `<|image_pad|>` k becomes
//!   `vocab + k`, and M-RoPE positions follow from (id, index).
//! - Determinism: every output value is one fixed-order reduction on one thread, so
//!   tokens and logits are bit-identical whatever the thread count.
//! - Threads: a forward pass keeps the pool's other threads awake between its many
//!   short parallel sections ([`awake`]); the bundles' weights are paged in once, in
//!   file order, when the engine opens ([`q3vl_bundle::Bundle::populate`]).
//!
//! ```no_run
//! use q3vl_engine::{Engine, EngineOptions, GenerateParams};
//! # fn main() -> Result<(), q3vl_engine::EngineError> {
//! let engine = Engine::open(std::path::Path::new("out"), &EngineOptions::default())?;
//! let prompt = engine.prompt_builder()?.chat("Hello", None)?;
//! let g = engine.generate(&prompt.ids, &[], &GenerateParams::default(), &mut |_| {})?;
//! println!("{:?}", g.tokens);
//! # Ok(()) }
//! ```

pub mod awake;
pub mod bench;
pub(crate) mod causal_attention;
pub mod decoder;
pub mod detokenize;
pub mod engine;
pub mod error;
pub mod images;
/// The compute kernels (the `q3vl-kernels` crate), under their engine-local name.
pub use q3vl_kernels as kernels;
pub mod kv_cache;
pub(crate) mod ops;
pub mod positions;
pub mod sampler;
pub mod sequence;
pub mod stamp;
pub mod vision;
pub(crate) mod vision_attention;
pub mod weights;

pub use engine::{Engine, EngineOptions, GenerateParams, Generation, Timings};
pub use error::{EngineError, Result};
pub use images::PromptImages;
pub use sequence::{Finish, PromptCache, Sequence};
pub use stamp::{pair_status, stamp_status, StampStatus};
pub use vision::EncodedImage;
