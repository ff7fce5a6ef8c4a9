//! Reading oracle traces (`docs/oracle-trace.md`): what fp32 HF computed for one
//! prompt, written by our `oracle/` or by anyone with the same layout. Version 2
//! (`qwen3vl-oracle-trace/2`) adds each logits row's log-sum-exp, so the KL divergence
//! can be computed from the top-k alone; version 1 traces still read.

use crate::error::{Result, VerifyError};
use candle_core::{Device, Tensor};
use q3vl_model::conversation::Message;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The format tag of the current version, which the oracle writes.
pub const FORMAT: &str = "qwen3vl-oracle-trace/2";

/// The first version, still read (no log-sum-exp; full logits when the writer kept them).
pub const FORMAT_V1: &str = "qwen3vl-oracle-trace/1";

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
    /// F64 tensors (the log-sum-exp rows of v2), flattened.
    doubles: BTreeMap<String, Vec<f64>>,
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
        let meta = read_meta(&bytes).map_err(bad)?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let mut t = OracleTrace {
            path: path.to_path_buf(),
            meta,
            floats: BTreeMap::new(),
            ints: BTreeMap::new(),
            doubles: BTreeMap::new(),
            sha256: String::new(),
        };
        for (name, view) in st.tensors() {
            t.add(name, &view)?;
        }
        use sha2::Digest;
        t.sha256 = hex::encode(sha2::Sha256::digest(&bytes));
        t.check_shapes()?;
        Ok(t)
    }

    /// Stores one tensor of the file by its dtype: floats as f32 (refusing non-finite
    /// values), f64 (the log-sum-exp rows) as they are, integers as i64.
    fn add(&mut self, name: String, view: &TensorView<'_>) -> Result<()> {
        let shape = view.shape().to_vec();
        let data = view.data();
        match view.dtype() {
            Dtype::F32 | Dtype::F16 | Dtype::BF16 => {
                let v = q3vl_model::weights::widen(&name, view.dtype(), data)?;
                // A NaN in the oracle would compare false against every gate.
                q3vl_model::weights::check_finite(&name, &v)
                    .map_err(|e| self.bad(e.to_string()))?;
                self.floats
                    .insert(name, Tensor::from_vec(v, shape, &Device::Cpu)?);
            }
            Dtype::F64 => {
                let v: Vec<f64> = data
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
                    .collect();
                if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                    return Err(
                        self.bad(format!("tensor {name}: non-finite value at flat index {i}"))
                    );
                }
                self.doubles.insert(name, v);
            }
            Dtype::I64 => {
                let v = data
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                    .collect();
                self.ints.insert(name, (shape, v));
            }
            Dtype::I32 => {
                let v = data
                    .chunks_exact(4)
                    .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")) as i64)
                    .collect();
                self.ints.insert(name, (shape, v));
            }
            other => return Err(self.bad(format!("tensor {name}: unexpected dtype {other:?}"))),
        }
        Ok(())
    }

    fn bad(&self, msg: String) -> VerifyError {
        VerifyError::Trace {
            path: self.path.clone(),
            msg,
        }
    }

    /// The error of a trace that does not fit the model it is compared with.
    pub(crate) fn mismatch(&self, msg: String) -> VerifyError {
        VerifyError::Mismatch {
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
            self.images()?;
        }
        let has_decode = self.ints.contains_key("decode.top_ids");
        if let (true, Ok((_, tokens))) = (has_decode, self.int("decode.tokens")) {
            let rows = self.int("decode.top_ids")?.0.first().copied();
            if rows != Some(tokens.len()) {
                return Err(self.bad(format!(
                    "decode.top_ids has {rows:?} rows for {} decode.tokens",
                    tokens.len()
                )));
            }
        }
        if self.version() >= 2 {
            self.lse("logits")?;
            if has_decode {
                self.lse("decode")?;
            }
        }
        for group in ["logits", "decode"] {
            if self.ints.contains_key(&format!("{group}.top_ids")) {
                self.full_logits_tensor(group)?;
            }
        }
        Ok(())
    }

    /// The format version: 1 or 2.
    pub fn version(&self) -> u32 {
        if self.meta("format") == FORMAT_V1 {
            1
        } else {
            2
        }
    }

    /// Who computed the trace: `transformers` (the HF oracle; every v1 trace) or
    /// `q3vl-reference` (q3vl's own fp32 reference, for models made at test time).
    pub fn oracle(&self) -> &str {
        match self.meta("oracle") {
            "" => "transformers",
            o => o,
        }
    }

    /// The log-sum-exp of each row of a logits group (`logits` or `decode`) over the
    /// whole vocabulary, in f64: `group.lse` of a v2 trace, else computed from the
    /// full logits when the trace holds them, else None.
    pub fn lse(&self, group: &str) -> Result<Option<Vec<f64>>> {
        let rows = self.int(&format!("{group}.top_ids"))?.0.first().copied();
        let name = format!("{group}.lse");
        if let Some(v) = self.doubles.get(&name) {
            if Some(v.len()) != rows {
                return Err(self.bad(format!(
                    "{name} has {} values, {group}.top_ids {rows:?} rows",
                    v.len()
                )));
            }
            // The whole vocabulary's log-sum-exp is at least its top-k's.
            let (_, vals) = self.top_k(group)?;
            for (r, (&l, top)) in v.iter().zip(&vals).enumerate() {
                let floor = crate::stats::log_sum_exp(top);
                if l < floor - 1e-6 * (1.0 + floor.abs()) {
                    return Err(self.bad(format!(
                        "{name} row {r} is {l}, below the log-sum-exp of its own top-k ({floor})"
                    )));
                }
            }
            return Ok(Some(v.clone()));
        }
        if self.version() >= 2 {
            return Err(self.bad(format!("tensor {name} is missing")));
        }
        Ok(self
            .full_logits(group)?
            .map(|l| l.iter().map(|r| crate::stats::log_sum_exp(r)).collect()))
    }

    /// The full `[rows, V]` logits of a group (`logits` or `decode`), when the writer
    /// kept them.
    pub fn full_logits(&self, group: &str) -> Result<Option<Vec<Vec<f32>>>> {
        match self.full_logits_tensor(group)? {
            Some(t) => Ok(Some(t.to_vec2::<f32>()?)),
            None => Ok(None),
        }
    }

    /// The full logits tensor of a group, checked to have one row per top-k row.
    fn full_logits_tensor(&self, group: &str) -> Result<Option<&Tensor>> {
        let name = match group {
            "logits" => "logits".to_string(),
            g => format!("{g}.logits"),
        };
        let rows = self.int(&format!("{group}.top_ids"))?.0.first().copied();
        match self.floats.get(&name) {
            Some(t) if t.rank() == 2 && Some(t.dims()[0]) == rows => Ok(Some(t)),
            Some(t) => Err(self.bad(format!(
                "{name} has shape {:?}, expected [{rows:?} rows, V]",
                t.dims()
            ))),
            None => Ok(None),
        }
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

    /// Each image's grid (t, h, w), in prompt order (none for a text trace).
    pub fn grids(&self) -> Result<Vec<[usize; 3]>> {
        if !self.has_image() {
            return Ok(vec![]);
        }
        let (s, g) = self.int("image_grid_thw")?;
        if s.len() != 2 || s[1] != 3 || s[0] == 0 {
            return Err(self.bad(format!(
                "image_grid_thw has shape {s:?}, expected [images, 3]"
            )));
        }
        if let Some(bad) = g.iter().find(|&&x| !(1..=1 << 20).contains(&x)) {
            return Err(self.bad(format!("image_grid_thw holds {bad}")));
        }
        let grids: Vec<[usize; 3]> = g
            .chunks_exact(3)
            .map(|r| [r[0] as usize, r[1] as usize, r[2] as usize])
            .collect();
        // Every later sum of patches stays far from overflowing.
        let total = grids.iter().try_fold(0u128, |acc, g| {
            Some(acc + g.iter().map(|&x| x as u128).product::<u128>())
        });
        if total.is_none_or(|t| t > 1 << 40) {
            return Err(self.bad("image_grid_thw asks for more patches than any image has".into()));
        }
        Ok(grids)
    }

    /// Each image's patch rows `[P_k, C·T·p·p]` (its share of `pixel_values`) and grid,
    /// in prompt order.
    pub fn images(&self) -> Result<Vec<(Tensor, [usize; 3])>> {
        let grids = self.grids()?;
        if grids.is_empty() {
            return Ok(vec![]);
        }
        let pv = self.float("pixel_values")?;
        let rows: usize = grids.iter().map(|g| g.iter().product::<usize>()).sum();
        if pv.dims().len() != 2 || pv.dims()[0] != rows {
            return Err(self.bad(format!(
                "pixel_values has shape {:?}; the grids {grids:?} need {rows} rows",
                pv.dims()
            )));
        }
        let mut at = 0;
        let mut out = Vec::with_capacity(grids.len());
        for g in grids {
            let p: usize = g.iter().product();
            out.push((pv.narrow(0, at, p)?, g));
            at += p;
        }
        Ok(out)
    }

    /// The image files named by the metadata (one per line), relative to the trace's
    /// folder, in prompt order.
    pub fn image_paths(&self) -> Vec<PathBuf> {
        let folder = self.path.parent().unwrap_or(Path::new("."));
        image_names(self.meta("image"))
            .map(|name| folder.join(name))
            .collect()
    }

    /// The conversation the prompt was rendered from (metadata `messages`, HF chat
    /// messages), or None for a one-turn trace (its `prompt`, after its images).
    pub fn messages(&self) -> Result<Option<Vec<Message>>> {
        let text = self.meta("messages");
        if text.is_empty() {
            return Ok(None);
        }
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| self.bad(format!("metadata messages is not JSON: {e}")))?;
        parse_messages(&v)
            .map(Some)
            .map_err(|msg| self.bad(format!("metadata messages: {msg}")))
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
        self.check_top_rows(group, &ids, &vals)?;
        Ok((ids, vals))
    }

    /// A top-k row is K ≥ 2 distinct ids with non-increasing values: anything else
    /// would make margins negative and the noise of a row of one token zero.
    fn check_top_rows(&self, group: &str, ids: &[Vec<i64>], vals: &[Vec<f32>]) -> Result<()> {
        for (r, (i, v)) in ids.iter().zip(vals).enumerate() {
            if i.len() < 2 {
                return Err(self.bad(format!(
                    "{group}.top_ids has K = {}, at least 2 needed",
                    i.len()
                )));
            }
            if v.windows(2).any(|w| w[1] > w[0]) {
                return Err(self.bad(format!(
                    "{group}.top_values row {r} is not sorted best first"
                )));
            }
            let distinct: std::collections::BTreeSet<&i64> = i.iter().collect();
            if distinct.len() != i.len() {
                return Err(self.bad(format!("{group}.top_ids row {r} repeats a token id")));
            }
        }
        Ok(())
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

/// The file's `__metadata__`, checked: a format this reader takes, and an image (when
/// named) inside the trace's folder.
fn read_meta(bytes: &[u8]) -> std::result::Result<BTreeMap<String, String>, String> {
    let (_, meta) =
        SafeTensors::read_metadata(bytes).map_err(|e| format!("not a safetensors file: {e}"))?;
    let meta: BTreeMap<String, String> = meta
        .metadata()
        .clone()
        .map(|m| m.into_iter().collect())
        .unwrap_or_default();
    match meta.get("format").map(String::as_str) {
        Some(FORMAT | FORMAT_V1) => {}
        Some(other) => {
            return Err(format!(
                "format is {other:?}, this reader takes {FORMAT:?} or {FORMAT_V1:?}"
            ))
        }
        None => return Err(format!("no \"format\" metadata (expected {FORMAT:?})")),
    }
    // The images are read from beside the trace: only names inside its folder.
    for img in image_names(meta.get("image").map_or("", String::as_str)) {
        if !q3vl_model::input::is_inner_path(img) {
            return Err(format!(
                "metadata image {img:?} is not a file inside the trace's folder"
            ));
        }
    }
    Ok(meta)
}

/// The image names of metadata `image`: one per line, none when empty.
fn image_names(meta: &str) -> impl Iterator<Item = &str> {
    meta.split('\n').filter(|n| !n.is_empty())
}

/// A conversation in HF's chat format: roles system, user, assistant; content a
/// string or parts `{"type": "text", "text": …}` and `{"type": "image"}`.
fn parse_messages(v: &serde_json::Value) -> std::result::Result<Vec<Message>, String> {
    use q3vl_model::conversation::{Part, Role};
    let list = v.as_array().ok_or("not a list")?;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.get("role").and_then(|r| r.as_str()) {
                Some("system") => Role::System,
                Some("user") => Role::User,
                Some("assistant") => Role::Assistant,
                other => return Err(format!("message {i} has role {other:?}")),
            };
            let parts = match m.get("content") {
                Some(serde_json::Value::String(s)) => vec![Part::Text(s.clone())],
                Some(serde_json::Value::Array(parts)) => parts
                    .iter()
                    .map(|p| match p.get("type").and_then(|t| t.as_str()) {
                        Some("image") => Ok(Part::Image),
                        Some("text") => p
                            .get("text")
                            .and_then(|t| t.as_str())
                            .map(|t| Part::Text(t.to_string()))
                            .ok_or(format!("message {i} has a text part without text")),
                        other => Err(format!("message {i} has a part of type {other:?}")),
                    })
                    .collect::<std::result::Result<_, _>>()?,
                _ => return Err(format!("message {i} has no content")),
            };
            Ok(Message { role, parts })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// A minimal trace: T = 2, K = 2, D = 1, H = 2; `f64s` are the F64 tensors and
    /// `extra` more F32 ones.
    fn minimal(
        path: &Path,
        format: &str,
        f64s: &[(&str, Vec<f64>)],
        extra: &[(&str, Vec<usize>, Vec<f32>)],
    ) {
        minimal_top(
            path,
            format,
            f64s,
            extra,
            (&[0, 1, 1, 0], &[2.0, 1.0, 3.0, 0.5]),
        );
    }

    /// [`minimal`] with the prompt's top-k ids and values given ([2, 2]).
    fn minimal_top(
        path: &Path,
        format: &str,
        f64s: &[(&str, Vec<f64>)],
        extra: &[(&str, Vec<usize>, Vec<f32>)],
        top: (&[i64], &[f32]),
    ) {
        let mut store: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = vec![];
        let i64s = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        store.push(("input_ids".into(), Dtype::I64, vec![2], i64s(&[1, 2])));
        store.push((
            "position_ids".into(),
            Dtype::I64,
            vec![3, 2],
            i64s(&[0, 1, 0, 1, 0, 1]),
        ));
        store.push(("decode.tokens".into(), Dtype::I64, vec![1], i64s(&[0])));
        store.push(("logits.top_ids".into(), Dtype::I64, vec![2, 2], i64s(top.0)));
        store.push((
            "decode.top_ids".into(),
            Dtype::I64,
            vec![1, 2],
            i64s(&[0, 1]),
        ));
        for (n, shape, v) in [
            ("text.embed", vec![2, 2], vec![1.0, 0.0, 0.0, 1.0]),
            ("text.norm", vec![2, 2], vec![1.0, 0.0, 0.0, 1.0]),
            ("logits.top_values", vec![2, 2], top.1.to_vec()),
            ("decode.top_values", vec![1, 2], vec![2.0, 1.0]),
        ] {
            store.push((n.into(), Dtype::F32, shape, f32s(&v)));
        }
        for (n, shape, v) in extra {
            store.push((n.to_string(), Dtype::F32, shape.clone(), f32s(v)));
        }
        for (n, v) in f64s {
            let b = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            store.push((n.to_string(), Dtype::F64, vec![v.len()], b));
        }
        let views: Vec<(String, TensorView<'_>)> = store
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        let meta = [("format".to_string(), format.to_string())]
            .into_iter()
            .collect();
        safetensors::serialize_to_file(views, Some(meta), path).unwrap();
    }

    #[test]
    fn version_2_carries_the_log_sum_exp_and_version_1_still_reads() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.safetensors");
        let lse = || vec![("logits.lse", vec![2.5, 3.1]), ("decode.lse", vec![2.4])];
        minimal(&p, FORMAT, &lse(), &[]);
        let t = OracleTrace::open(&p).unwrap();
        assert_eq!((t.version(), t.oracle()), (2, "transformers"));
        assert_eq!(t.lse("logits").unwrap(), Some(vec![2.5, 3.1]));
        assert_eq!(t.lse("decode").unwrap(), Some(vec![2.4]));

        // v2 without a decode.lse, or with one of the wrong length, or a NaN: refused.
        minimal(&p, FORMAT, &lse()[..1], &[]);
        let e = OracleTrace::open(&p).err().unwrap().to_string();
        assert!(
            e.contains("t.safetensors") && e.contains("decode.lse is missing"),
            "{e}"
        );
        minimal(
            &p,
            FORMAT,
            &[("logits.lse", vec![1.0]), ("decode.lse", vec![2.4])],
            &[],
        );
        let e = OracleTrace::open(&p).err().unwrap().to_string();
        assert!(e.contains("logits.lse has 1 values"), "{e}");
        minimal(
            &p,
            FORMAT,
            &[
                ("logits.lse", vec![1.0, f64::NAN]),
                ("decode.lse", vec![2.4]),
            ],
            &[],
        );
        let e = OracleTrace::open(&p).err().unwrap().to_string();
        assert!(e.contains("logits.lse") && e.contains("non-finite"), "{e}");

        // v1: no log-sum-exp unless the full logits are there to compute it from.
        minimal(&p, FORMAT_V1, &[], &[]);
        let t = OracleTrace::open(&p).unwrap();
        assert_eq!((t.version(), t.lse("logits").unwrap()), (1, None));
        let full = vec![0.0f32, 2.0, 1.0, 3.0, 0.5, 0.0];
        minimal(&p, FORMAT_V1, &[], &[("logits", vec![2, 3], full)]);
        let l = OracleTrace::open(&p)
            .unwrap()
            .lse("logits")
            .unwrap()
            .unwrap();
        let want = (1f64 + 2f64.exp() + 1f64.exp()).ln();
        assert!((l[0] - want).abs() < 1e-12, "{l:?}");
        // Full logits with another row count are refused.
        minimal(&p, FORMAT_V1, &[], &[("logits", vec![1, 3], vec![0.0; 3])]);
        assert!(OracleTrace::open(&p).is_err());
    }

    #[test]
    fn top_k_rows_must_be_distinct_sorted_and_below_the_log_sum_exp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.safetensors");
        let lse = [("logits.lse", vec![3.5, 3.5]), ("decode.lse", vec![2.4])];
        let refused = |top: (&[i64], &[f32]), lse: &[(&str, Vec<f64>)], want: &str| {
            minimal_top(&p, FORMAT, lse, &[], top);
            let e = OracleTrace::open(&p).err().expect(want).to_string();
            assert!(e.contains("t.safetensors") && e.contains(want), "{e}");
        };
        refused(
            (&[0, 1, 1, 0], &[1.0, 2.0, 3.0, 0.5]),
            &lse,
            "row 0 is not sorted",
        );
        refused(
            (&[0, 0, 1, 0], &[2.0, 1.0, 3.0, 0.5]),
            &lse,
            "row 0 repeats a token id",
        );
        let low = [("logits.lse", vec![2.0, 3.5]), ("decode.lse", vec![2.4])];
        refused(
            (&[0, 1, 1, 0], &[2.0, 1.0, 3.0, 0.5]),
            &low,
            "logits.lse row 0",
        );
        minimal_top(
            &p,
            FORMAT,
            &lse,
            &[],
            (&[0, 1, 1, 0], &[2.0, 2.0, 3.0, 0.5]),
        );
        assert!(OracleTrace::open(&p).is_ok(), "equal values are sorted");
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
