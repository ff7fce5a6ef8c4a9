//! The reference's weights read from a GGUF pair made by anyone: each tensor
//! dequantized by candle's GGUF reader, so the ladder runs on exactly the values
//! llama.cpp computes with; and each tensor's rounding, for the noise allowance.

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use q3vl_gguf::GgufModel;
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
}

fn gguf_err(e: q3vl_gguf::GgufError) -> Error {
    Error::Safetensors {
        path: "gguf".into(),
        msg: e.to_string(),
    }
}

fn check_shape(name: &str, found: &[usize], expected: &[usize]) -> Result<()> {
    if found != expected {
        return Err(Error::Shape {
            name: name.into(),
            expected: expected.to_vec(),
            found: found.to_vec(),
        });
    }
    Ok(())
}

impl WeightSource for GgufSource<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (v, dims) = self.model.weight(name).map_err(gguf_err)?;
        check_shape(name, &dims, shape)?;
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }

    fn rows(&self, name: &str, shape: [usize; 2], ids: &[u32]) -> Result<Tensor> {
        let (f, gg) = self.model.locate(name).ok_or_else(|| Error::Safetensors {
            path: "gguf".into(),
            msg: format!("no GGUF tensor holds {name}"),
        })?;
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

/// Levels of a K-quant's (or 8-bit's) codes, for a rounding step estimated from a
/// sub-block's range; None for the types whose block scale is read exactly.
fn estimated_levels(t: GgmlDType) -> Option<(usize, f64)> {
    match t {
        GgmlDType::Q8_1 | GgmlDType::Q8K => Some((32, 255.0)),
        GgmlDType::Q6K => Some((16, 63.0)),
        GgmlDType::Q5K => Some((32, 31.0)),
        GgmlDType::Q4K => Some((32, 15.0)),
        GgmlDType::Q3K => Some((16, 7.0)),
        GgmlDType::Q2K => Some((16, 3.0)),
        _ => None,
    }
}

impl crate::noise::RoundingVariance for GgufSource<'_> {
    /// Q8_0, Q4_0/1, Q5_0/1: `d²/12` from each 32-block's stored scale `d` (the step
    /// of its grid); the K-quants: `step²/12` with the step estimated as each
    /// sub-block's range over its code levels; F16 and BF16: half an ulp of each value;
    /// F32: 0.
    fn rounding_variance(
        &self,
        name: &str,
        shape: [usize; 2],
        ids: &[u32],
    ) -> crate::Result<Vec<f64>> {
        let ty = self.model.dtype(name).ok_or_else(|| Error::Safetensors {
            path: "gguf".into(),
            msg: format!("no GGUF tensor holds {name}"),
        })?;
        let cols = shape[1];
        let clamp: Vec<u32> = ids
            .iter()
            .map(|&i| i.min(shape[0].saturating_sub(1) as u32))
            .collect();
        if let GgmlDType::Q8_0
        | GgmlDType::Q4_0
        | GgmlDType::Q4_1
        | GgmlDType::Q5_0
        | GgmlDType::Q5_1 = ty
        {
            return Ok(self.block_scales(name, cols, &clamp, ty)?);
        }
        let w = self
            .rows(name, shape, &clamp)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(match (ty, estimated_levels(ty)) {
            (_, Some((sub, levels))) => w
                .chunks(sub)
                .flat_map(|b| {
                    let (lo, hi) = b
                        .iter()
                        .fold((f32::MAX, f32::MIN), |(l, h), &x| (l.min(x), h.max(x)));
                    let step = (hi - lo) as f64 / levels;
                    std::iter::repeat_n(step * step / 12.0, b.len())
                })
                .collect(),
            (GgmlDType::F16, _) => w
                .iter()
                .map(|&x| crate::noise::f16_rounding_variance(x))
                .collect(),
            (GgmlDType::BF16, _) => w.iter().map(|&x| bf16_rounding_variance(x)).collect(),
            _ => vec![0.0; w.len()],
        })
    }
}

impl GgufSource<'_> {
    /// `d²/12` per element, `d` each 32-block's leading f16 scale.
    fn block_scales(
        &self,
        name: &str,
        cols: usize,
        ids: &[u32],
        ty: GgmlDType,
    ) -> Result<Vec<f64>> {
        let (f, gg) = self.model.locate(name).expect("dtype found it");
        let (block, bytes) = (ty.block_size(), ty.type_size());
        let mut out = Vec::with_capacity(ids.len() * cols);
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

/// Half a bf16 ulp of `w`, squared over 3 (the variance of rounding to bf16).
fn bf16_rounding_variance(w: f32) -> f64 {
    let a = (w.abs() as f64).max(f64::powi(2.0, -126));
    let ulp = f64::powi(2.0, a.log2().floor() as i32 - 7);
    ulp * ulp / 12.0
}
