//! The reference's weights read from a bundle pair: every tensor dequantized exactly
//! as the bundle stores it (int8 × f16 block scale, or widened f16/f32), one tensor
//! at a time, so the quantized ladder sees what the engine sees.

use candle_core::{Device, Tensor};
use q3vl_bundle::{Bundle, Bundles, Dtype};
use q3vl_model::layout::{EMBED, LM_HEAD, VISUAL};
use q3vl_model::{Error, Qwen3VlConfig, Result, WeightSource};

/// A [`WeightSource`] over a language + vision bundle pair.
pub struct BundleSource<'a> {
    bundles: &'a Bundles,
}

impl<'a> BundleSource<'a> {
    /// Reads from `bundles`.
    pub fn new(bundles: &'a Bundles) -> Self {
        BundleSource { bundles }
    }

    fn bundle(&self, name: &str) -> &Bundle {
        if name.starts_with(VISUAL) {
            &self.bundles.vision
        } else {
            &self.bundles.language
        }
    }
}

fn bundle_err(e: q3vl_bundle::BundleError) -> Error {
    Error::Safetensors {
        path: "bundle".into(),
        msg: e.to_string(),
    }
}

/// A shape error unless `found` is `expected`.
pub(crate) fn check_shape(name: &str, found: &[usize], expected: &[usize]) -> Result<()> {
    if found != expected {
        return Err(Error::Shape {
            name: name.into(),
            expected: expected.to_vec(),
            found: found.to_vec(),
        });
    }
    Ok(())
}

impl WeightSource for BundleSource<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let b = self.bundle(name);
        let (_, found, _) = b.raw(name).map_err(bundle_err)?;
        check_shape(name, found, shape)?;
        let v = b.dequantized(name).map_err(bundle_err)?;
        // The values are copied out: keep the mapped bytes out of the resident set, so
        // a streamed 8B ladder holds about one layer, not the whole bundle.
        b.release(name);
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }

    fn rows(&self, name: &str, shape: [usize; 2], ids: &[u32]) -> Result<Tensor> {
        let b = self.bundle(name);
        let cols = shape[1];
        let mut out = Vec::with_capacity(ids.len() * cols);
        let bad_id = |id: u32| {
            Error::Prompt(format!(
                "token id {id} is outside {name} ({} rows)",
                shape[0]
            ))
        };
        if let Some((q, s, dims)) = b.q8(name) {
            check_shape(name, &dims, &shape)?;
            let nb = cols / 32;
            for &id in ids {
                let r = id as usize;
                if r >= shape[0] {
                    return Err(bad_id(id));
                }
                for (blk, sc) in q[r * cols..(r + 1) * cols]
                    .chunks(32)
                    .zip(&s[r * nb..(r + 1) * nb])
                {
                    let sf = sc.to_f32();
                    out.extend(blk.iter().map(|&v| v as f32 * sf));
                }
            }
        } else {
            let (dtype, found, bytes) = b.raw(name).map_err(bundle_err)?;
            check_shape(name, found, &shape)?;
            let st = match dtype {
                Dtype::F16 => safetensors::tensor::Dtype::F16,
                Dtype::F32 => safetensors::tensor::Dtype::F32,
                Dtype::BF16 => safetensors::tensor::Dtype::BF16,
                Dtype::I8 | Dtype::I32 | Dtype::I64 => {
                    return Err(Error::Dtype {
                        name: name.into(),
                        dtype: dtype.as_str().into(),
                        expected: "a quantized scheme in metadata.json".into(),
                    })
                }
            };
            let row_bytes = cols * dtype.size();
            for &id in ids {
                let r = id as usize;
                if r >= shape[0] {
                    return Err(bad_id(id));
                }
                out.extend(q3vl_model::weights::widen(
                    name,
                    st,
                    &bytes[r * row_bytes..(r + 1) * row_bytes],
                )?);
            }
        }
        b.release(name);
        Ok(Tensor::from_vec(out, (ids.len(), cols), &Device::Cpu)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.bundle(name).raw(name).is_ok()
    }

    /// A bundle says which tensor its head is: an int8hu bundle stores its own
    /// `lm_head.weight` even for a tied source; int8lin/fp16 of a tied source do not.
    fn head_name(&self, cfg: &Qwen3VlConfig) -> &'static str {
        match self.bundles.language.head_tensor() {
            Some(LM_HEAD) => LM_HEAD,
            Some(_) => EMBED,
            None if cfg.tie_word_embeddings => EMBED,
            None => LM_HEAD,
        }
    }
}

impl crate::noise::RoundingVariance for BundleSource<'_> {
    /// int8 weights: `s²/12` from each block's stored scale; f16 ones: an ulp²/12 of
    /// each value (an over-estimate for bf16 sources, which f16 holds exactly); f32: 0.
    fn rounding_variance(
        &self,
        name: &str,
        shape: [usize; 2],
        ids: &[u32],
    ) -> crate::Result<Vec<f64>> {
        let b = self.bundle(name);
        let cols = shape[1];
        if let Some((_, s, dims)) = b.q8(name) {
            check_shape(name, &dims, &shape)?;
            let nb = cols / 32;
            let mut out = Vec::with_capacity(ids.len() * cols);
            for &id in ids {
                let r = (id as usize).min(shape[0].saturating_sub(1));
                for sc in &s[r * nb..(r + 1) * nb] {
                    let v = (sc.to_f32() as f64).powi(2) / 12.0;
                    out.extend(std::iter::repeat_n(v, 32));
                }
            }
            b.release(name);
            return Ok(out);
        }
        let f32_stored = matches!(b.raw(name), Ok((Dtype::F32, _, _)));
        let w = self
            .rows(name, shape, ids)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(w.iter()
            .map(|&x| match f32_stored {
                true => 0.0,
                false => crate::noise::f16_rounding_variance(x),
            })
            .collect())
    }
}
