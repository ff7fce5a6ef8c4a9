//! Where the reference reads its weights from: a checkpoint, or (in `verify`) a
//! bundle's dequantized tensors. Tensors are fetched when a layer runs and dropped
//! after it, so an 8B model never sits in memory in f32 at once.

use crate::config::Qwen3VlConfig;
use crate::error::Result;
use crate::layout::{EMBED, LM_HEAD};
use crate::weights::Checkpoint;
use candle_core::{Device, Tensor};

/// A provider of f32 weights by HF name.
pub trait WeightSource {
    /// The whole tensor, checked to have `shape`.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor>;

    /// Rows `ids` of a 2-D tensor of shape `shape`, as `[ids.len(), shape[1]]`.
    fn rows(&self, name: &str, shape: [usize; 2], ids: &[u32]) -> Result<Tensor>;

    /// Whether the source holds a tensor of this name.
    fn contains(&self, name: &str) -> bool;

    /// The tensor the LM head reads. The default is HF's tie semantics: the embedding
    /// table whenever the config ties them, even if a head is stored (checkpoints).
    fn head_name(&self, cfg: &Qwen3VlConfig) -> &'static str {
        if cfg.tie_word_embeddings {
            EMBED
        } else {
            LM_HEAD
        }
    }
}

impl WeightSource for Checkpoint {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        Checkpoint::tensor(self, name, shape)
    }

    fn rows(&self, name: &str, shape: [usize; 2], ids: &[u32]) -> Result<Tensor> {
        self.check_shape(name, &shape)?;
        let (info, bytes) = self.bytes(name)?;
        let row_bytes = bytes.len() / shape[0].max(1);
        let mut out = Vec::with_capacity(ids.len() * shape[1]);
        for &id in ids {
            let id = id as usize;
            if id >= shape[0] {
                return Err(crate::Error::Prompt(format!(
                    "token id {id} is outside {name} ({} rows)",
                    shape[0]
                )));
            }
            let row = &bytes[id * row_bytes..(id + 1) * row_bytes];
            out.extend(crate::weights::widen(name, info.dtype, row)?);
        }
        Ok(Tensor::from_vec(out, (ids.len(), shape[1]), &Device::Cpu)?)
    }

    fn contains(&self, name: &str) -> bool {
        Checkpoint::contains(self, name)
    }
}
