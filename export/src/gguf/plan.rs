//! Which tensors the two GGUF files hold, under llama.cpp's names, and where each one's
//! bytes come from in the bundles.
//!
//! Text (`qwen3vl`): every int8 per-block-32 weight (the decoder's linears and an int8
//! head, `absmax` values −128..127 included) becomes Q8_0, losslessly: a Q8_0 block is
//! the block's f16 scale followed by its 32 int8 values, which is what the bundle stores
//! for it, interleaved. The embedding and any f16 weight stay F16, the norms F32.
//! Projector (`clip`, `qwen3vl_merger`): the vision bundle's f16 weights and f32 vectors as
//! they are, the Conv3d patch embedding split into its two temporal halves, the merger as
//! `mm.0`/`mm.2`, each DeepStack merger under the index of the ViT block it reads.

use super::file::{GgmlType, TensorInfo};
use crate::error::{ExportError, Result};
use q3vl_bundle::{Bundle, Bundles, Dtype, Scheme};
use q3vl_gguf::names;
use q3vl_model::layout::LM_HEAD;
use q3vl_model::Qwen3VlConfig;

/// Where one GGUF tensor's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The language bundle's int8 weight of this name, as Q8_0 blocks.
    Q8(String),
    /// A language bundle tensor as stored (f16 or f32).
    Text(String),
    /// A vision bundle tensor as stored (f16 or f32).
    Vision(String),
    /// Temporal half `k` of the vision bundle's Conv3d patch embedding.
    PatchHalf(usize),
}

/// One tensor of a GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensor {
    /// Its name, shape and type.
    pub info: TensorInfo,
    /// Where its bytes come from.
    pub origin: Origin,
}

/// The text GGUF's tensors, in file order.
pub fn text(b: &Bundle, cfg: &Qwen3VlConfig) -> Result<Vec<GgufTensor>> {
    let with_head = b.metadata().tensors.contains_key(LM_HEAD);
    names::text_pairs(cfg, with_head)
        .iter()
        .map(|(hf, gg)| text_tensor(b, hf, gg))
        .collect()
}

/// One language tensor: Q8_0 when stored int8, else as stored.
fn text_tensor(b: &Bundle, hf: &str, name: &str) -> Result<GgufTensor> {
    let meta = b.metadata().tensors.get(hf).ok_or_else(|| missing(b, hf))?;
    let (dtype, shape, _) = b.raw(hf)?;
    let (ty, origin) = match meta.scheme {
        Scheme::Int8Clip | Scheme::Int8AbsMax if !matches!(*shape, [_, c] if c > 0 && c % 32 == 0) => {
            return Err(ExportError::Unsupported {
                path: b.dir().to_path_buf(),
                msg: format!("tensor {hf}: an int8 weight of shape {shape:?}, not [out, in] with in a positive multiple of 32"),
            })
        }
        Scheme::Int8Clip | Scheme::Int8AbsMax => (GgmlType::Q8_0, Origin::Q8(hf.into())),
        _ => (stored_type(b, hf, dtype)?, Origin::Text(hf.into())),
    };
    Ok(GgufTensor {
        info: TensorInfo {
            name: name.into(),
            shape: shape.to_vec(),
            ty,
        },
        origin,
    })
}

fn stored_type(b: &Bundle, name: &str, dtype: Dtype) -> Result<GgmlType> {
    match dtype {
        Dtype::F16 => Ok(GgmlType::F16),
        Dtype::F32 => Ok(GgmlType::F32),
        other => Err(ExportError::Unsupported {
            path: b.dir().to_path_buf(),
            msg: format!("tensor {name}: stored {other}, which GGUF gets only as Q8_0 from int8"),
        }),
    }
}

fn missing(b: &Bundle, name: &str) -> ExportError {
    ExportError::Unsupported {
        path: b.dir().to_path_buf(),
        msg: format!("tensor {name}: not in the bundle"),
    }
}

/// The projector GGUF's tensors, in file order: the patch embedding's temporal halves,
/// then every other vision tensor under llama.cpp's name.
pub fn mmproj(bundles: &Bundles, cfg: &Qwen3VlConfig) -> Result<Vec<GgufTensor>> {
    let b = &bundles.vision;
    let [d, c, t, p, q] = patch_shape(b, cfg)?;
    let mut out: Vec<GgufTensor> = (0..t)
        .map(|k| GgufTensor {
            info: TensorInfo {
                name: names::patch_half(k),
                shape: vec![d, c, p, q],
                ty: GgmlType::F16,
            },
            origin: Origin::PatchHalf(k),
        })
        .collect();
    for (hf, name) in names::mmproj_pairs(cfg) {
        let (dtype, shape, _) = b.raw(&hf)?;
        out.push(GgufTensor {
            info: TensorInfo {
                name,
                shape: shape.to_vec(),
                ty: stored_type(b, &hf, dtype)?,
            },
            origin: Origin::Vision(hf),
        });
    }
    Ok(out)
}

/// The Conv3d patch embedding's `[out, channels, temporal, p, p]`, stored f16.
fn patch_shape(b: &Bundle, cfg: &Qwen3VlConfig) -> Result<[usize; 5]> {
    let name = names::patch_embed();
    let (dtype, shape, _) = b.raw(&name)?;
    match *shape {
        [d, c, t, p, q] if dtype == Dtype::F16 && t == cfg.vision.temporal_patch_size => {
            Ok([d, c, t, p, q])
        }
        _ => Err(ExportError::Unsupported {
            path: b.dir().to_path_buf(),
            msg: format!("tensor {name}: {dtype} {shape:?}, not an f16 [out, 3, temporal, p, p]"),
        }),
    }
}
