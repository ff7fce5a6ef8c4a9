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
use q3vl_model::layout::{self, EMBED, LM_HEAD};
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
    let mut out = vec![
        text_tensor(b, EMBED, "token_embd.weight")?,
        text_tensor(
            b,
            &format!("{}.norm.weight", layout::TEXT),
            "output_norm.weight",
        )?,
    ];
    if b.metadata().tensors.contains_key(LM_HEAD) {
        out.push(text_tensor(b, LM_HEAD, "output.weight")?);
    }
    let leaves = [
        ("input_layernorm.weight", "attn_norm"),
        ("self_attn.q_proj.weight", "attn_q"),
        ("self_attn.k_proj.weight", "attn_k"),
        ("self_attn.v_proj.weight", "attn_v"),
        ("self_attn.o_proj.weight", "attn_output"),
        ("self_attn.q_norm.weight", "attn_q_norm"),
        ("self_attn.k_norm.weight", "attn_k_norm"),
        ("post_attention_layernorm.weight", "ffn_norm"),
        ("mlp.gate_proj.weight", "ffn_gate"),
        ("mlp.up_proj.weight", "ffn_up"),
        ("mlp.down_proj.weight", "ffn_down"),
    ];
    for i in 0..cfg.text.num_hidden_layers {
        for (leaf, name) in leaves {
            out.push(text_tensor(
                b,
                &layout::text_layer(i, leaf),
                &format!("blk.{i}.{name}.weight"),
            )?);
        }
    }
    Ok(out)
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
                name: match k {
                    0 => "v.patch_embd.weight".to_string(),
                    k => format!("v.patch_embd.weight.{k}"),
                },
                shape: vec![d, c, p, q],
                ty: GgmlType::F16,
            },
            origin: Origin::PatchHalf(k),
        })
        .collect();
    for (hf, name) in mmproj_names(cfg) {
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

/// (HF name, llama.cpp name) of every vision tensor but the Conv3d weight: the merger is
/// `v.post_ln`/`mm.0`/`mm.2`, a DeepStack merger `v.deepstack.L` with `L` the ViT block it
/// reads (as llama.cpp's converter names them).
fn mmproj_names(cfg: &Qwen3VlConfig) -> Vec<(String, String)> {
    let v = &cfg.vision;
    let both = |hf: String, gg: String| {
        ["weight", "bias"].map(|part| (format!("{hf}.{part}"), format!("{gg}.{part}")))
    };
    let mut out = vec![
        (
            layout::visual("patch_embed.proj.bias"),
            "v.patch_embd.bias".into(),
        ),
        (
            layout::visual("pos_embed.weight"),
            "v.position_embd.weight".into(),
        ),
    ];
    let block = [
        ("norm1", "ln1"),
        ("attn.qkv", "attn_qkv"),
        ("attn.proj", "attn_out"),
        ("norm2", "ln2"),
        ("mlp.linear_fc1", "ffn_up"),
        ("mlp.linear_fc2", "ffn_down"),
    ];
    for j in 0..v.depth {
        for (hf, gg) in block {
            out.extend(both(layout::vision_block(j, hf), format!("v.blk.{j}.{gg}")));
        }
    }
    for (hf, gg) in [
        ("norm", "v.post_ln"),
        ("linear_fc1", "mm.0"),
        ("linear_fc2", "mm.2"),
    ] {
        out.extend(both(layout::visual(&format!("merger.{hf}")), gg.into()));
    }
    for (k, &layer) in v.deepstack_visual_indexes.iter().enumerate() {
        for (hf, gg) in [
            ("norm", "norm"),
            ("linear_fc1", "fc1"),
            ("linear_fc2", "fc2"),
        ] {
            out.extend(both(
                layout::deepstack(k, hf),
                format!("v.deepstack.{layer}.{gg}"),
            ));
        }
    }
    out
}

/// The Conv3d patch embedding's `[out, channels, temporal, p, p]`, stored f16.
fn patch_shape(b: &Bundle, cfg: &Qwen3VlConfig) -> Result<[usize; 5]> {
    let name = layout::visual("patch_embed.proj.weight");
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
