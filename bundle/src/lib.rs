//! The q3vl bundle format: the one reader and the one writer of it.
//!
//! A conversion run writes two folders into its output folder:
//!
//! ```text
//! <out>/<short>_decode_<mode>/          the language bundle
//!     model.safetensors                 (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
//!     config.json                       the source checkpoint's config, verbatim
//!     metadata.json                     format tag, schemes, source, producer, checksums
//!     tokenizer/tokenizer.json
//!     tokenizer/tokenizer_config.json   always carries "chat_template"
//!     tokenizer/generation_config.json  when the source has one
//! <out>/<short>_vision/                 the vision bundle (f16 weights, f32 vectors and pos_embed)
//!     model.safetensors  config.json  metadata.json  preprocessor_config.json
//! ```
//!
//! Tensor names are the Hugging Face names. A quantized weight `NAME` is stored as
//! `NAME` (I8, `[out, in]`) plus `NAME.scales` (F16, `[out, in/32]`); see
//! `docs/quantization.md` for the arithmetic.
//!
//! Reading: [`Bundle::open`] (one folder) or [`Bundles::open`] (the language +
//! vision pair of an output folder), under a [`ReadClaim`] for as long as they are
//! used (a shared lock on the output folder: a conversion into it fails at once
//! meanwhile). Writing: [`Staging::begin`] claims the output folder (an exclusive lock
//! on its `.q3vl-lock` for the whole run, so a second run fails at once naming the
//! folder, and a run-unique hidden staging folder; leftovers of killed runs are
//! cleaned under the lock), [`BundleWriter`] stages a bundle there, [`WeightsWriter`]
//! streams safetensors files into it with bounded memory, and [`StagedBundle::commit`]
//! renames it into place. `--force` replaces only q3vl bundles of the same kind
//! ([`ensure_replaceable`]), never a user's folder of the same name.
//!
//! The pair cannot appear half-written: the language bundle records the sha256 of its
//! vision bundle's `metadata.json` (`companion_sha256`), the vision bundle is committed
//! first, and [`Bundles::open`] refuses a language bundle whose vision bundle is
//! missing or from another conversion. A plain re-run of `q3vl convert` repairs such a
//! pair (see the `pair` and `staging` modules).
//!
//! The format is little-endian only, like safetensors itself.

#![warn(missing_docs)]

#[cfg(target_endian = "big")]
compile_error!("q3vl bundles are little-endian; big-endian targets are not supported");

mod checksum;
mod direct_file;
mod dtype;
mod error;
mod metadata;
pub mod names;
mod pair;
mod reader;
mod st_writer;
mod staging;
pub mod stamp;
mod table;
mod writer;

pub use checksum::{sha256_file, FileCheck};
pub use direct_file::DirectFile;
pub use dtype::Dtype;
pub use error::{BundleError, LockHolder};
pub use metadata::{
    FileEntry, FixedGrid, HeadInfo, Kind, Metadata, Mode, Preprocessing, Producer, Scheme, Source,
    TensorMeta, BLOCK, FORMAT_TAG, FORMAT_VERSION,
};
pub use pair::Bundles;
pub use reader::Bundle;
pub use st_writer::{ShardPolicy, TensorPlan, WeightsWriter, WrittenFile};
pub use staging::{ReadClaim, Staging};
pub use stamp::{check_stamp, pair_status, Stamp, StampStatus, STAMP_FILE};
pub use table::{Listing, StoredTensor};
pub use writer::{ensure_replaceable, BundleWriter, StagedBundle};

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, BundleError>;
