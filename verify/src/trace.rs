//! Reading `qwen3vl-oracle-trace/1` files (`docs/oracle-trace.md`): what fp32 HF
//! computed for one prompt, written by our `oracle/` or by anyone with the same layout.

use crate::error::{Result, VerifyError};
use candle_core::{Device, Tensor};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The format tag every trace carries in its `__metadata__`.
pub const FORMAT: &str = "qwen3vl-oracle-trace/1";

/// Per-row top-k ids and their logits.
pub type TopK = (Vec<Vec<i64>>, Vec<Vec<f32>>);

/// A loaded oracle trace.
pub struct OracleTrace {
    /// The file it came from.
    pub path: PathBuf,
    /// `__metadata__` (format, model, prompt, image, versions, ...).
    pub meta: BTreeMap<String, String>,
    /// Floating tensors, as f32.
    floats: BTreeMap<String, Tensor>,
    /// Integer tensors, as i64, with their shapes.
    ints: BTreeMap<String, (Vec<usize>, Vec<i64>)>,
    /// sha256 of the file's bytes.
    pub sha256: String,
}

impl OracleTrace {
    /// Opens and checks a trace file.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |msg: String| VerifyError::Trace {
            path: path.to_path_buf(),
            msg,
        };
        let bytes = q3vl_model::input::read_regular(path).map_err(|e| bad(e.to_string()))?;
        let (_, meta) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let meta: BTreeMap<String, String> = meta
            .metadata()
            .clone()
            .map(|m| m.into_iter().collect())
            .unwrap_or_default();
        match meta.get("format").map(String::as_str) {
            Some(FORMAT) => {}
            Some(other) => {
                return Err(bad(format!(
                    "format is {other:?}, this reader takes {FORMAT:?}"
                )))
            }
            None => return Err(bad(format!("no \"format\" metadata (expected {FORMAT:?})"))),
        }
        // The image is read from beside the trace: only a name inside its folder.
        if let Some(img) = meta.get("image").filter(|i| !i.is_empty()) {
            if !q3vl_model::input::is_inner_path(img) {
                return Err(bad(format!(
                    "metadata image {img:?} is not a file inside the trace's folder"
                )));
            }
        }
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let mut floats = BTreeMap::new();
        let mut ints = BTreeMap::new();
        for (name, view) in st.tensors() {
            let shape = view.shape().to_vec();
            let data = view.data();
            match view.dtype() {
                Dtype::F32 | Dtype::F16 | Dtype::BF16 => {
                    let v = q3vl_model::weights::widen(&name, view.dtype(), data)?;
                    // A NaN in the oracle would compare false against every gate.
                    q3vl_model::weights::check_finite(&name, &v).map_err(|e| bad(e.to_string()))?;
                    floats.insert(name, Tensor::from_vec(v, shape, &Device::Cpu)?);
                }
                Dtype::I64 => {
                    let v = data
                        .chunks_exact(8)
                        .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                        .collect();
                    ints.insert(name, (shape, v));
                }
                Dtype::I32 => {
                    let v = data
                        .chunks_exact(4)
                        .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")) as i64)
                        .collect();
                    ints.insert(name, (shape, v));
                }
                other => return Err(bad(format!("tensor {name}: unexpected dtype {other:?}"))),
            }
        }
        use sha2::Digest;
        let sha256 = hex::encode(sha2::Sha256::digest(&bytes));
        let t = OracleTrace {
            path: path.to_path_buf(),
            meta,
            floats,
            ints,
            sha256,
        };
        t.check_shapes()?;
        Ok(t)
    }

    fn bad(&self, msg: String) -> VerifyError {
        VerifyError::Trace {
            path: self.path.clone(),
            msg,
        }
    }

    /// Internal consistency: the required tensors exist with agreeing shapes.
    fn check_shapes(&self) -> Result<()> {
        let (s, ids) = self.int("input_ids")?;
        if s.len() != 1 {
            return Err(self.bad(format!("input_ids has shape {s:?}, expected [T]")));
        }
        let t = ids.len();
        let (s, _) = self.int("position_ids")?;
        if s != [3, t] {
            return Err(self.bad(format!("position_ids has shape {s:?}, expected [3, {t}]")));
        }
        for name in ["text.embed", "text.norm"] {
            let d = self.float(name)?.dims().to_vec();
            if d.len() != 2 || d[0] != t {
                return Err(self.bad(format!("{name} has shape {d:?}, expected [{t}, H]")));
            }
        }
        let (s, _) = self.int("logits.top_ids")?;
        if s.len() != 2 || s[0] != t || s[1] < 2 {
            return Err(self.bad(format!(
                "logits.top_ids has shape {s:?}, expected [{t}, K≥2]"
            )));
        }
        if self.has_image() {
            self.int("image_grid_thw")?;
            self.float("pixel_values")?;
        }
        Ok(())
    }

    /// A floating tensor by name.
    pub fn float(&self, name: &str) -> Result<&Tensor> {
        self.floats
            .get(name)
            .ok_or_else(|| self.bad(format!("tensor {name} is missing")))
    }

    /// An optional floating tensor.
    pub fn float_opt(&self, name: &str) -> Option<&Tensor> {
        self.floats.get(name)
    }

    /// An integer tensor (shape, values) by name.
    pub fn int(&self, name: &str) -> Result<(&[usize], &[i64])> {
        self.ints
            .get(name)
            .map(|(s, v)| (s.as_slice(), v.as_slice()))
            .ok_or_else(|| self.bad(format!("tensor {name} is missing")))
    }

    /// Whether the trace was made with an image.
    pub fn has_image(&self) -> bool {
        self.ints.contains_key("image_grid_thw") || self.floats.contains_key("pixel_values")
    }

    /// A metadata value ("" when absent).
    pub fn meta(&self, key: &str) -> &str {
        self.meta.get(key).map(String::as_str).unwrap_or("")
    }

    /// The prompt ids.
    pub fn input_ids(&self) -> Result<Vec<u32>> {
        Ok(self.int("input_ids")?.1.iter().map(|&x| x as u32).collect())
    }

    /// M-RoPE positions per token.
    pub fn positions(&self) -> Result<Vec<[i64; 3]>> {
        let (_, p) = self.int("position_ids")?;
        let t = p.len() / 3;
        Ok((0..t).map(|i| [p[i], p[t + i], p[2 * t + i]]).collect())
    }

    /// The image grid (t, h, w), for image traces.
    pub fn grid_thw(&self) -> Result<Option<[usize; 3]>> {
        if !self.has_image() {
            return Ok(None);
        }
        let (s, g) = self.int("image_grid_thw")?;
        if g.len() != 3 {
            return Err(self.bad(format!(
                "image_grid_thw has shape {s:?}; only one image per trace is supported"
            )));
        }
        Ok(Some([g[0] as usize, g[1] as usize, g[2] as usize]))
    }

    /// The image file named by the metadata, relative to the trace's folder.
    pub fn image_path(&self) -> Option<PathBuf> {
        let name = self.meta("image");
        if name.is_empty() {
            return None;
        }
        Some(self.path.parent().unwrap_or(Path::new(".")).join(name))
    }

    /// `[rows, K]` top-k ids and values of a logits group (`logits` or `decode`).
    pub fn top_k(&self, group: &str) -> Result<TopK> {
        let (s, ids) = self.int(&format!("{group}.top_ids"))?;
        let vals = self.float(&format!("{group}.top_values"))?;
        // Checked here, not left to indexing and candle: a trace is outside input.
        if s.len() != 2 || s[1] == 0 || vals.dims() != s {
            return Err(self.bad(format!(
                "{group}.top_ids {s:?} and {group}.top_values {:?} must both be [rows, K ≥ 1]",
                vals.dims()
            )));
        }
        let vals = vals.to_vec2::<f32>()?;
        let k = s[1];
        let ids: Vec<Vec<i64>> = ids.chunks(k).map(|c| c.to_vec()).collect();
        if ids.len() != vals.len() {
            return Err(self.bad(format!("{group}.top_ids and top_values disagree in rows")));
        }
        Ok((ids, vals))
    }

    /// The oracle's greedy continuation.
    pub fn decode_tokens(&self) -> Result<Vec<u32>> {
        Ok(self
            .int("decode.tokens")?
            .1
            .iter()
            .map(|&x| x as u32)
            .collect())
    }

    /// Names of every floating tensor.
    pub fn float_names(&self) -> impl Iterator<Item = &str> {
        self.floats.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    /// A trace file holding one f32 tensor `x` with `values` and `meta`.
    fn write(path: &Path, values: &[f32], meta: &[(&str, &str)]) {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = TensorView::new(Dtype::F32, vec![values.len()], &bytes).unwrap();
        let mut m: std::collections::HashMap<String, String> = meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        m.insert("format".into(), FORMAT.into());
        safetensors::serialize_to_file([("x", view)], Some(m), path).unwrap();
    }

    #[test]
    fn non_finite_oracle_values_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("house.safetensors");
        for bad in [f32::NAN, f32::INFINITY] {
            write(&p, &[1.0, bad], &[]);
            let e = OracleTrace::open(&p).err().unwrap().to_string();
            assert!(
                e.contains("house.safetensors")
                    && e.contains("tensor x")
                    && e.contains("non-finite"),
                "{e}"
            );
        }
    }

    #[test]
    fn the_image_must_be_beside_the_trace() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.safetensors");
        for img in ["../../etc/passwd", "/etc/passwd"] {
            write(&p, &[1.0], &[("image", img)]);
            let e = OracleTrace::open(&p).err().unwrap().to_string();
            assert!(e.contains("t.safetensors") && e.contains(img), "{e}");
        }
    }
}
