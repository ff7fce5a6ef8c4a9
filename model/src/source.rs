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
        let t = Checkpoint::tensor(self, name, shape)?;
        // The values are copied out: keep the mapped bytes out of the resident set
        // (they stay in the page cache), so a streamed 8B ladder holds about one
        // layer in f32, not every page of the checkpoint it has read.
        self.release_tensor(name);
        Ok(t)
    }

    fn rows(&self, name: &str, shape: [usize; 2], ids: &[u32]) -> Result<Tensor> {
        self.check_shape(name, &shape)?;
        let (info, bytes) = self.bytes(name)?;
        let row_bytes = bytes.len() / shape[0].max(1);
        let mut out = Vec::with_capacity(ids.len() * shape[1]);
        // Rows read so far and not yet released, as one byte range: consecutive ids
        // (the head's chunks) give one release per call, not one per row.
        let mut run: Option<std::ops::Range<usize>> = None;
        for &id in ids {
            let id = id as usize;
            if id >= shape[0] {
                return Err(crate::Error::Prompt(format!(
                    "token id {id} is outside {name} ({} rows)",
                    shape[0]
                )));
            }
            let row = id * row_bytes..(id + 1) * row_bytes;
            out.extend(crate::weights::widen(
                name,
                info.dtype,
                &bytes[row.clone()],
            )?);
            run = match run {
                Some(r) if r.end == row.start => Some(r.start..row.end),
                Some(r) => {
                    self.release(name, r);
                    Some(row)
                }
                None => Some(row),
            };
        }
        // As in `tensor`: what was widened leaves the resident set.
        if let Some(r) = run {
            self.release(name, r);
        }
        Ok(Tensor::from_vec(out, (ids.len(), shape[1]), &Device::Cpu)?)
    }

    fn contains(&self, name: &str) -> bool {
        Checkpoint::contains(self, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::{Dtype, TensorView};

    /// A checkpoint of one bf16 `[4, 3]` tensor `w` (row r = r, r + 0.5, r + 1) and
    /// one f32 `[2]` tensor `b`.
    fn checkpoint(dir: &std::path::Path) -> Checkpoint {
        let w: Vec<u8> = (0..4)
            .flat_map(|r| [r as f32, r as f32 + 0.5, r as f32 + 1.0])
            .flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes())
            .collect();
        let b: Vec<u8> = [1.0f32, -1.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let views = vec![
            ("w", TensorView::new(Dtype::BF16, vec![4, 3], &w).unwrap()),
            ("b", TensorView::new(Dtype::F32, vec![2], &b).unwrap()),
        ];
        safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
        Checkpoint::open(dir).unwrap()
    }

    /// Every byte the reference widens is handed back to the kernel: whole tensors at
    /// once, rows as runs of consecutive ids. Without this a streamed 8B ladder keeps
    /// every page it read resident (15 GB, BENCHMARKS.md).
    #[test]
    fn widened_bytes_are_released() {
        let dir = tempfile::tempdir().unwrap();
        let ck = checkpoint(dir.path());
        let src: &dyn WeightSource = &ck;
        let t = src.tensor("b", &[2]).unwrap();
        assert_eq!(t.to_vec1::<f32>().unwrap(), vec![1.0, -1.0]);
        assert_eq!(ck.released(), vec![("b".to_string(), 0..8)]);
        let r = src.rows("w", [4, 3], &[1, 2, 0, 3]).unwrap();
        assert_eq!(
            r.to_vec2::<f32>().unwrap(),
            vec![
                vec![1.0, 1.5, 2.0],
                vec![2.0, 2.5, 3.0],
                vec![0.0, 0.5, 1.0],
                vec![3.0, 3.5, 4.0]
            ]
        );
        // Rows are 6 bytes: ids 1, 2 form one run, then 0, then 3.
        let w = |r: std::ops::Range<usize>| ("w".to_string(), r);
        assert_eq!(ck.released()[1..], [w(6..18), w(0..6), w(18..24)]);
        // A failed read releases nothing it did not read.
        let n = ck.released().len();
        assert!(src.rows("w", [4, 3], &[4]).is_err());
        assert!(src.tensor("w", &[3, 4]).is_err());
        assert_eq!(ck.released().len(), n);
    }
}
