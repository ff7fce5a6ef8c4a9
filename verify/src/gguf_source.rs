//! The reference's weights read from a GGUF pair made by anyone: each tensor
//! dequantized by candle's GGUF reader, so the ladder runs on exactly the values
//! llama.cpp computes with; and each tensor's rounding, for the noise allowance.

use crate::bundle_source::check_shape;
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use q3vl_gguf::{GgufError, GgufModel};
use q3vl_model::{Error, Qwen3VlConfig, Result, WeightSource};

/// A [`WeightSource`] over a GGUF text model and projector.
pub struct GgufSource<'a> {
    model: &'a GgufModel,
}

impl<'a> GgufSource<'a> {
    /// Reads from `model`.
    pub fn new(model: &'a GgufModel) -> Self {
        GgufSource { model }
    }

    /// The file and GGUF name of HF tensor `name`, or an error naming the text file.
    fn locate(&self, name: &str) -> Result<(&q3vl_gguf::GgufFile, &str)> {
        self.model.locate(name).ok_or_else(|| self.missing(name))
    }

    /// No GGUF tensor holds HF tensor `name`, said naming the text file.
    fn missing(&self, name: &str) -> Error {
        Error::Safetensors {
            path: self.model.text.path().to_path_buf(),
            msg: format!("no GGUF tensor holds {name}"),
        }
    }
}

/// A GGUF fault as the model's error, keeping the file and the fault.
fn gguf_err(e: GgufError) -> Error {
    match e {
        GgufError::File { path, msg } => Error::Safetensors { path, msg },
        GgufError::Io { path, source } => Error::Safetensors {
            path,
            msg: source.to_string(),
        },
    }
}

impl WeightSource for GgufSource<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        // The shape first: a wrong one is refused before anything is dequantized.
        if let Ok((f, gg)) = self.locate(name) {
            let dims = f.info(gg).map(|(_, d)| d.to_vec()).unwrap_or_default();
            check_shape(name, &dims, shape)?;
        }
        let (v, dims) = self.model.weight(name).map_err(gguf_err)?;
        check_shape(name, &dims, shape)?;
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }

    fn rows(&self, name: &str, shape: [usize; 2], ids: &[u32]) -> Result<Tensor> {
        let (f, gg) = self.locate(name)?;
        let dims = f.info(gg).map(|(_, d)| d.to_vec()).unwrap_or_default();
        check_shape(name, &dims, &shape)?;
        let v = f.rows(gg, ids).map_err(gguf_err)?;
        Ok(Tensor::from_vec(v, (ids.len(), shape[1]), &Device::Cpu)?)
    }

    fn contains(&self, name: &str) -> bool {
        name == q3vl_gguf::names::patch_embed() || self.model.locate(name).is_some()
    }

    /// A GGUF has `output.weight` when its head is its own; otherwise the head is the
    /// embedding table, as llama.cpp reads it.
    fn head_name(&self, _cfg: &Qwen3VlConfig) -> &'static str {
        self.model.head_name()
    }
}

/// The rounding step of one sub-block of a type whose step is not stored as a block's
/// leading f16 (the K-quants, Q8_1), estimated from its dequantized values: symmetric
/// types map max |x| to their largest code (Q8_K, Q8_1: 127; Q6_K: 32; Q3_K: 4), the
/// ones with a minimum spread the range over their levels (Q5_K: 31; Q4_K: 15; Q2_K: 3).
/// Returns (values per sub-block, step), or None for other types.
pub fn estimated_step(t: GgmlDType, block: &[f32]) -> Option<f64> {
    let max_abs = block.iter().fold(0f32, |m, &x| m.max(x.abs())) as f64;
    let (lo, hi) = block
        .iter()
        .fold((f32::MAX, f32::MIN), |(l, h), &x| (l.min(x), h.max(x)));
    let range = (hi - lo) as f64;
    Some(match t {
        GgmlDType::Q8_1 | GgmlDType::Q8K => max_abs / 127.0,
        GgmlDType::Q6K => max_abs / 32.0,
        GgmlDType::Q3K => max_abs / 4.0,
        GgmlDType::Q5K => range / 31.0,
        GgmlDType::Q4K => range / 15.0,
        GgmlDType::Q2K => range / 3.0,
        _ => return None,
    })
}

/// Values per sub-block with their own scale (the estimate's unit).
fn sub_block(t: GgmlDType) -> usize {
    match t {
        GgmlDType::Q6K | GgmlDType::Q3K | GgmlDType::Q2K => 16,
        _ => 32,
    }
}

impl crate::noise::RoundingVariance for GgufSource<'_> {
    /// Q8_0, Q4_0/1, Q5_0/1: `d²/12` from each 32-block's stored scale `d` (the step
    /// of its grid); the K-quants and Q8_1: `step²/12` with the step estimated from each
    /// sub-block ([`estimated_step`]); F16 and BF16: half an ulp of each value (an
    /// over-estimate for a bf16 checkpoint, which BF16 holds exactly); F32: 0.
    fn rounding_variance(
        &self,
        name: &str,
        shape: [usize; 2],
        ids: &[u32],
    ) -> crate::Result<Vec<f64>> {
        let ty = self.model.dtype(name).ok_or_else(|| self.missing(name))?;
        let last = shape[0].saturating_sub(1) as u32;
        let clamp: Vec<u32> = ids.iter().map(|&i| i.min(last)).collect();
        use GgmlDType::{Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
        if let Q8_0 | Q4_0 | Q4_1 | Q5_0 | Q5_1 = ty {
            return Ok(self.block_scales(name, &clamp, ty)?);
        }
        let w = self
            .rows(name, shape, &clamp)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let var = |s: f64| s * s / 12.0;
        Ok(match ty {
            GgmlDType::F16 => w
                .iter()
                .map(|&x| crate::noise::f16_rounding_variance(x))
                .collect(),
            GgmlDType::BF16 => w.iter().map(|&x| bf16_rounding_variance(x)).collect(),
            GgmlDType::F32 => vec![0.0; w.len()],
            _ => w
                .chunks(sub_block(ty))
                .flat_map(|b| {
                    let v = var(estimated_step(ty, b).unwrap_or(0.0));
                    std::iter::repeat_n(v, b.len())
                })
                .collect(),
        })
    }
}

impl GgufSource<'_> {
    /// `d²/12` per element, `d` each 32-block's leading f16 scale.
    fn block_scales(&self, name: &str, ids: &[u32], ty: GgmlDType) -> Result<Vec<f64>> {
        let (f, gg) = self.locate(name)?;
        let (block, bytes) = (ty.block_size(), ty.type_size());
        let mut out = Vec::new();
        for &id in ids {
            let r = f.raw_row(gg, id as usize).map_err(gguf_err)?;
            for b in r.chunks_exact(bytes) {
                let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32() as f64;
                out.extend(std::iter::repeat_n(d * d / 12.0, block));
            }
        }
        Ok(out)
    }
}

/// The variance of rounding `w` to bf16: a uniform error over one ulp, ulp²/12.
fn bf16_rounding_variance(w: f32) -> f64 {
    let a = (w.abs() as f64).max(f64::powi(2.0, -126));
    let ulp = f64::powi(2.0, a.log2().floor() as i32 - 7);
    ulp * ulp / 12.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;

    /// Gaussian-like weights from a fixed linear congruential sequence.
    fn weights(n: usize) -> Vec<f32> {
        let mut s = 12345u64;
        (0..n)
            .map(|_| {
                let mut acc = 0.0;
                for _ in 0..4 {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    acc += (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                }
                acc
            })
            .collect()
    }

    /// The estimated variance against the error candle's own quantizer makes (the
    /// ggml reference rounding): within a factor 2 either way for every K-quant.
    #[test]
    fn estimated_steps_match_the_rounding_candle_makes() {
        let w = weights(256 * 64);
        let t = Tensor::from_vec(w.clone(), (64, 256), &Device::Cpu).unwrap();
        for ty in [
            GgmlDType::Q6K,
            GgmlDType::Q5K,
            GgmlDType::Q4K,
            GgmlDType::Q3K,
            GgmlDType::Q2K,
            GgmlDType::Q8K,
        ] {
            let q = QTensor::quantize(&t, ty).unwrap();
            let d = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let actual: f64 = w
                .iter()
                .zip(&d)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>()
                / w.len() as f64;
            let est: f64 = d
                .chunks(sub_block(ty))
                .map(|b| estimated_step(ty, b).unwrap().powi(2) / 12.0 * b.len() as f64)
                .sum::<f64>()
                / d.len() as f64;
            let ratio = est / actual;
            eprintln!("{ty:?}: estimated / actual rounding variance {ratio:.2}");
            assert!(
                (0.5..2.0).contains(&ratio),
                "{ty:?}: estimated {est:.3e}, actual {actual:.3e}"
            );
        }
    }

    #[test]
    fn bf16_variance_is_an_ulp_squared_over_12() {
        // 1.0: bf16's ulp is 2^-7.
        assert_eq!(bf16_rounding_variance(1.0), f64::powi(2.0, -14) / 12.0);
        assert_eq!(bf16_rounding_variance(-3.0), f64::powi(2.0, -12) / 12.0);
    }
}
