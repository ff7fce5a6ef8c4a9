//! Reading a bundle: [`Bundle::open`] and the tensor accessors the engine and the
//! verifier use.

use crate::checksum::{sha256_file, FileCheck};
use crate::error::BundleError;
use crate::metadata::{Kind, Metadata, Scheme, BLOCK};
use crate::names::scales_name;
use crate::Dtype;
use half::f16;
use q3vl_model::{Checkpoint, Qwen3VlConfig};
use std::path::{Path, PathBuf};

/// An open bundle: `metadata.json`, the parsed `config.json`, and the memory-mapped
/// weights.
///
/// ```no_run
/// # fn main() -> Result<(), q3vl_bundle::BundleError> {
/// use q3vl_bundle::Bundle;
/// let b = Bundle::open(std::path::Path::new("out/qwen3_vl_8b_instruct_decode_int8hu"))?;
/// let cfg = b.config();
/// for name in b.tensor_names() {
///     if let Some((q, scales, [rows, cols])) = b.q8(name) {
///         // zero-copy int8 weight: q[r*cols + c] * f32(scales[r*cols/32 + c/32])
///         let _ = (q, scales, rows, cols);
///     } else {
///         let _values: Vec<f32> = b.dequantized(name)?;
///     }
/// }
/// // The LM head may be the embedding table (tied source converted without untying).
/// let _head = b.head_tensor();
/// # let _ = cfg; Ok(()) }
/// ```
pub struct Bundle {
    dir: PathBuf,
    metadata: Metadata,
    config: Qwen3VlConfig,
    weights: Checkpoint,
}

impl Bundle {
    /// Opens the bundle in `dir`.
    ///
    /// Reads and checks `metadata.json` (format tag and version), checks that every
    /// file it lists exists with the recorded size (cheap; the sha256 check is
    /// [`Bundle::verify_checksums`]), parses `config.json`, memory-maps the weights and
    /// checks every listed tensor is stored with its scheme's dtype (and quantized ones
    /// with well-formed, aligned `.scales`).
    pub fn open(dir: &Path) -> Result<Bundle, BundleError> {
        let metadata = Metadata::read(dir)?;
        for (rel, entry) in &metadata.files {
            let p = dir.join(rel);
            let len = std::fs::metadata(&p)
                .map_err(|e| BundleError::io(&p, e))?
                .len();
            if len != entry.size {
                return Err(BundleError::SizeMismatch {
                    path: p,
                    expected: entry.size,
                    found: len,
                });
            }
        }
        let config = Qwen3VlConfig::from_dir(dir)?;
        let weights = Checkpoint::open(dir)?;
        // Readers of a bundle (the engine above all) read its weights whole, often.
        weights.advise_huge_pages();
        let b = Bundle {
            dir: dir.to_path_buf(),
            metadata,
            config,
            weights,
        };
        b.check_tensors()?;
        Ok(b)
    }

    fn check_tensors(&self) -> Result<(), BundleError> {
        let bad = |name: &str, msg: String| BundleError::Tensor {
            name: name.into(),
            msg,
        };
        let mut scales = Vec::new();
        for (name, meta) in &self.metadata.tensors {
            let (dtype, shape, bytes) = self.raw(name)?;
            if dtype != meta.scheme.dtype() {
                return Err(bad(
                    name,
                    format!(
                        "stored as {dtype}, but its scheme {} needs {}",
                        meta.scheme,
                        meta.scheme.dtype()
                    ),
                ));
            }
            if meta.scheme.is_quantized() {
                let sname = scales_name(name);
                let (sd, ss, sb) = self.raw(&sname)?;
                let ok = shape.len() == 2
                    && shape[1] % BLOCK == 0
                    && sd == Dtype::F16
                    && ss == [shape[0], shape[1] / BLOCK];
                if !ok {
                    return Err(bad(
                        &sname,
                        format!("{sd} {ss:?} does not fit weight {name} {shape:?} (F16 [out, in/32] expected)"),
                    ));
                }
                if !(sb.as_ptr() as usize).is_multiple_of(2) {
                    return Err(bad(&sname, "is not 2-byte aligned in its file".into()));
                }
                scales.push((sname, sb));
            }
            let _ = bytes;
        }
        self.check_scales(scales)?;
        for name in self.weights.names() {
            let base = name
                .strip_suffix(crate::names::SCALES_SUFFIX)
                .unwrap_or(name);
            if !self.metadata.tensors.contains_key(base) {
                return Err(bad(
                    name,
                    "is stored but not listed in metadata.json".into(),
                ));
            }
        }
        Ok(())
    }

    /// Every int8 block scale must be finite: one NaN or infinity makes every logit
    /// NaN downstream. Scales are ~6% of a bundle's bytes; they are read in file order
    /// (as [`Bundle::populate`] reads, for the same page-cache reasons) and dropped from
    /// the resident set afterwards, so a streaming reader's peak memory does not grow.
    fn check_scales(&self, mut scales: Vec<(String, &[u8])>) -> Result<(), BundleError> {
        scales.sort_by_key(|(_, b)| b.as_ptr() as usize);
        for (name, bytes) in scales {
            // An f16 is NaN or infinite exactly when its exponent bits are all ones.
            let bad = bytes
                .chunks_exact(2)
                .position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7C00 == 0x7C00);
            if let Some(i) = bad {
                let v = f16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]);
                return Err(BundleError::Tensor {
                    name,
                    msg: format!("scale {i} is {v}, not a finite number (damaged bundle)"),
                });
            }
            if let Some(info) = self.weights.info(&name) {
                self.weights.release(&name, 0..info.range.len());
            }
        }
        Ok(())
    }

    /// The bundle folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed `metadata.json`.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Language or vision.
    pub fn kind(&self) -> Kind {
        self.metadata.kind
    }

    /// The model configuration from the bundle's `config.json` (the source's config).
    pub fn config(&self) -> &Qwen3VlConfig {
        &self.config
    }

    /// The memory-mapped weight files, for callers that need file-level access.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.weights
    }

    /// Every logical tensor, sorted. A quantized weight's `NAME.scales` is not listed
    /// (read it through [`Bundle::q8`] or [`Bundle::raw`]).
    pub fn tensor_names(&self) -> Vec<&str> {
        self.metadata.tensors.keys().map(String::as_str).collect()
    }

    /// How a logical tensor is stored (after any f16 fallback).
    pub fn scheme(&self, name: &str) -> Option<Scheme> {
        self.metadata.tensors.get(name).map(|t| t.scheme)
    }

    /// The tensor to use as the LM head (language bundles): `lm_head.weight`, or the
    /// embedding table when a tied source was converted in `int8lin`/`fp16` (no
    /// separate head is stored then; multiply by the embedding instead).
    pub fn head_tensor(&self) -> Option<&str> {
        self.metadata.head.as_ref().map(|h| h.tensor.as_str())
    }

    /// A stored tensor's location and bytes, or an error naming it and this bundle.
    fn stored(&self, name: &str) -> Result<(&q3vl_model::weights::TensorInfo, &[u8]), BundleError> {
        self.weights
            .bytes(name)
            .map_err(|_| BundleError::MissingTensor {
                name: name.into(),
                bundle: self.dir.clone(),
            })
    }

    /// A stored tensor as it is on disk: dtype, shape and little-endian bytes
    /// (zero-copy from the memory map). Works for `.scales` tensors too.
    pub fn raw(&self, name: &str) -> Result<(Dtype, &[usize], &[u8]), BundleError> {
        let (info, bytes) = self.stored(name)?;
        let dtype = Dtype::from_safetensors(info.dtype).ok_or_else(|| BundleError::Tensor {
            name: name.into(),
            msg: format!("dtype {:?} is not one a bundle stores", info.dtype),
        })?;
        Ok((dtype, &info.shape, bytes))
    }

    /// A tensor as f32 values, row-major: int8 × its f16 block scale for quantized
    /// weights (exactly `f32(q) * f32(s)`), exact widening for f16/f32 tensors.
    ///
    /// For the LM head, ask [`Bundle::head_tensor`] which tensor it is: a tied source
    /// converted in `int8lin` or `fp16` stores no `lm_head.weight`, and the head is
    /// the embedding table.
    pub fn dequantized(&self, name: &str) -> Result<Vec<f32>, BundleError> {
        if let Some((q, s, [_, cols])) = self.q8(name) {
            let nb = cols / BLOCK;
            let mut out = vec![0f32; q.len()];
            for ((orow, qrow), srow) in out.chunks_mut(cols).zip(q.chunks(cols)).zip(s.chunks(nb)) {
                for ((ob, qb), sc) in orow.chunks_mut(BLOCK).zip(qrow.chunks(BLOCK)).zip(srow) {
                    let sf = sc.to_f32();
                    for (o, &v) in ob.iter_mut().zip(qb) {
                        *o = v as f32 * sf;
                    }
                }
            }
            return Ok(out);
        }
        let (info, bytes) = self.stored(name)?;
        if info.dtype == safetensors::tensor::Dtype::I8 {
            return Err(BundleError::Tensor {
                name: name.into(),
                msg: "is int8 without a quantized scheme in metadata.json".into(),
            });
        }
        Ok(q3vl_model::weights::widen(name, info.dtype, bytes)?)
    }

    /// A quantized weight, zero-copy: its int8 values (row-major `[out, in]`), its f16
    /// scales (row-major `[out, in/32]`) and `[out, in]`. `None` when the tensor is
    /// absent or not stored as int8.
    pub fn q8(&self, name: &str) -> Option<(&[i8], &[f16], [usize; 2])> {
        if !self.scheme(name)?.is_quantized() {
            return None;
        }
        let (_, shape, qb) = self.raw(name).ok()?;
        let (_, _, sb) = self.raw(&scales_name(name)).ok()?;
        // SAFETY: i8 and u8 have the same size and alignment and every bit pattern is valid.
        let q = unsafe { std::slice::from_raw_parts(qb.as_ptr() as *const i8, qb.len()) };
        // SAFETY: f16 is a transparent u16 (any bit pattern valid); `open` checked the
        // scales are 2-byte aligned, so the prefix and suffix are empty.
        let (pre, s, post) = unsafe { sb.align_to::<f16>() };
        if !pre.is_empty() || !post.is_empty() {
            return None;
        }
        Some((q, s, [shape[0], shape[1]]))
    }

    /// The mapped bytes of every stored tensor of the logical tensors `keep` accepts (a
    /// quantized weight is two stored tensors: its int8 values and its scales), in
    /// address order, so each file's tensors come in file order.
    pub fn stored_bytes(&self, keep: impl Fn(&str) -> bool) -> Vec<&[u8]> {
        let mut parts = Vec::new();
        for n in self.tensor_names() {
            if !keep(n) {
                continue;
            }
            let scales = self.q8(n).map(|_| scales_name(n));
            for stored in std::iter::once(n.to_owned()).chain(scales) {
                if let Ok((_, _, b)) = self.raw(&stored) {
                    parts.push(b);
                }
            }
        }
        parts.sort_by_key(|b| b.as_ptr() as usize);
        parts
    }

    /// Makes the stored bytes of the logical tensors `keep` accepts resident: one read
    /// per 4 KiB page, in file order, on the calling thread. Returns the bytes covered.
    ///
    /// Why one thread, in order: a file's readahead state is shared by every fault on
    /// it, so faults from several threads at once interleave and part of the file is
    /// read into folios smaller than the 2 MiB that [`Bundle::open`] asks for, mapped
    /// 4 KiB at a time for as long as it stays cached. On a 2-core Xeon host, the 8B
    /// bundle paged in by two threads was 89% 2 MiB-mapped (the vision tower, paged in
    /// by its encoder, 33%), and a plain sum read its weights at 29.9 GB/s; paged in
    /// in order it was 100% 2 MiB-mapped and read at 32.4 GB/s. The disk, not the
    /// CPU, sets the pace of a cold read, so one thread costs nothing there.
    pub fn populate(&self, keep: impl Fn(&str) -> bool) -> usize {
        const PAGE: usize = 4096;
        let parts = self.stored_bytes(keep);
        let mut sum = 0u8;
        for b in &parts {
            for byte in b.iter().step_by(PAGE) {
                // SAFETY: a reference to a mapped byte; volatile, so the read is kept.
                sum = sum.wrapping_add(unsafe { std::ptr::read_volatile(byte) });
            }
        }
        std::hint::black_box(sum);
        parts.iter().map(|b| b.len()).sum()
    }

    /// Drops tensor `name` (and its scales) from this process's resident set. The
    /// bytes stay in the page cache and fault back in if read again. For readers that
    /// copy a tensor out (the reference's dequantized weights): without this every
    /// mapped page they ever read counts towards their peak memory, the whole bundle.
    pub fn release(&self, name: &str) {
        for n in [name.to_string(), scales_name(name)] {
            if let Some(info) = self.weights.info(&n) {
                self.weights.release(&n, 0..info.range.len());
            }
        }
    }

    /// [`Bundle::release`] for every tensor: the whole bundle leaves the resident set
    /// (a reader that is done with it for now; it faults back in from the page cache).
    pub fn release_all(&self) {
        for n in self.weights.names() {
            if let Some(info) = self.weights.info(n) {
                self.weights.release(n, 0..info.range.len());
            }
        }
    }

    /// Every listed file's size and sha256 against `metadata.json` (reads the whole
    /// bundle, on all cores).
    pub fn check_files(&self) -> Vec<FileCheck> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let items: Vec<_> = self.metadata.files.iter().collect();
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(items.len().max(1));
        let next = AtomicUsize::new(0);
        let mut done: Vec<(usize, FileCheck)> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        let mut mine = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some((rel, expected)) = items.get(i) else {
                                break mine;
                            };
                            let (found, error) = match sha256_file(&self.dir.join(rel)) {
                                Ok(f) => (Some(f), None),
                                Err(e) => (None, Some(e.to_string())),
                            };
                            mine.push((
                                i,
                                FileCheck {
                                    file: (*rel).clone(),
                                    expected: (*expected).clone(),
                                    found,
                                    error,
                                },
                            ));
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().expect("hashing does not panic"))
                .collect()
        });
        done.sort_by_key(|(i, _)| *i);
        done.into_iter().map(|(_, c)| c).collect()
    }

    /// Checks every listed file's sha256; the first mismatch is an error naming it.
    pub fn verify_checksums(&self) -> Result<(), BundleError> {
        for c in self.check_files() {
            let path = self.dir.join(&c.file);
            match c.found {
                None => {
                    return Err(BundleError::io(
                        path,
                        std::io::Error::other(c.error.unwrap_or_default()),
                    ))
                }
                Some(f) if f.size != c.expected.size => {
                    return Err(BundleError::SizeMismatch {
                        path,
                        expected: c.expected.size,
                        found: f.size,
                    })
                }
                Some(f) if f.sha256 != c.expected.sha256 => {
                    return Err(BundleError::ChecksumMismatch {
                        path,
                        expected: c.expected.sha256,
                        found: f.sha256,
                    })
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::metadata::{Kind, TensorMeta};
    use crate::{BundleWriter, ShardPolicy, TensorPlan, WeightsWriter};
    use std::collections::BTreeMap;

    /// A two-tensor bundle: an int8 weight [2, 64] with scales, and an f32 vector.
    pub(crate) fn make(out: &Path) -> PathBuf {
        let q: Vec<u8> = (0..128).map(|i| (i as i8 - 64) as u8).collect();
        let s: Vec<u8> = [0.5f32, 0.25, 2.0, -1.0]
            .iter()
            .flat_map(|x| f16::from_f32(*x).to_le_bytes())
            .collect();
        let v: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let mut w = BundleWriter::create(out, "b").unwrap();
        let plan = vec![
            TensorPlan::new("w", Dtype::I8, vec![2, 64]),
            TensorPlan::new("w.scales", Dtype::F16, vec![2, 2]),
            TensorPlan::new("n", Dtype::F32, vec![2]),
        ];
        let mut ww =
            WeightsWriter::create(w.dir(), &plan, ShardPolicy::default(), &BTreeMap::new())
                .unwrap();
        ww.write("w", q).unwrap();
        ww.write("w.scales", s).unwrap();
        ww.write("n", v).unwrap();
        w.record(ww.finish().unwrap());
        let cfg = q3vl_model::Qwen3VlConfig::preset(q3vl_model::Size::B2).to_hf_json();
        w.add_file("config.json", &serde_json::to_vec_pretty(&cfg).unwrap())
            .unwrap();
        let mut m = Metadata::new(Kind::Language, "b");
        for (name, class, scheme) in [
            ("w", "text_linear", Scheme::Int8Clip),
            ("n", "vector", Scheme::F32),
        ] {
            m.tensors.insert(
                name.into(),
                TensorMeta {
                    class: class.into(),
                    scheme,
                    source: None,
                },
            );
        }
        w.finish(m).unwrap().commit(false).unwrap()
    }

    #[test]
    fn accessors_agree_with_what_was_written() {
        let out = tempfile::tempdir().unwrap();
        let b = Bundle::open(&make(out.path())).unwrap();
        assert_eq!(b.tensor_names(), vec!["n", "w"]);
        let (q, s, dims) = b.q8("w").unwrap();
        assert_eq!(dims, [2, 64]);
        assert_eq!((q[0], q[127]), (-64, 63));
        assert_eq!(s[3].to_f32(), -1.0);
        let d = b.dequantized("w").unwrap();
        assert_eq!((d[0], d[32], d[64], d[127]), (-32.0, -8.0, 0.0, -63.0));
        assert_eq!(b.dequantized("n").unwrap(), vec![1.5, -2.0]);
        assert!(b.q8("n").is_none());
        let (dt, shape, bytes) = b.raw("w.scales").unwrap();
        assert_eq!((dt, shape, bytes.len()), (Dtype::F16, &[2usize, 2][..], 8));
        let e = b.raw("x").unwrap_err().to_string();
        assert!(e.contains("tensor x"), "{e}");
        b.verify_checksums().unwrap();
        assert!(b.check_files().iter().all(FileCheck::ok));
    }

    #[test]
    fn stored_bytes_and_populate_cover_the_chosen_tensors() {
        let out = tempfile::tempdir().unwrap();
        let b = Bundle::open(&make(out.path())).unwrap();
        // "w" is two stored tensors (128 int8 values, 8 bytes of scales), in file order.
        let parts = b.stored_bytes(|n| n == "w");
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            vec![128, 8]
        );
        assert!(parts[0].as_ptr() < parts[1].as_ptr());
        assert_eq!(parts[0], b.raw("w").unwrap().2);
        assert_eq!(b.stored_bytes(|_| true).len(), 3);
        assert_eq!(b.populate(|n| n == "w"), 136);
        assert_eq!(b.populate(|n| n == "n"), 8);
        assert_eq!(b.populate(|_| true), 144);
        assert_eq!(b.populate(|_| false), 0);
    }

    #[test]
    fn non_finite_scales_are_refused_at_open() {
        for bad in [f16::NAN, f16::INFINITY, f16::NEG_INFINITY] {
            let out = tempfile::tempdir().unwrap();
            let dir = make(out.path());
            let b = Bundle::open(&dir).unwrap();
            let info = b.checkpoint().info("w.scales").unwrap().clone();
            drop(b);
            let p = dir.join("model.safetensors");
            let mut bytes = std::fs::read(&p).unwrap();
            let at = info.range.start + 2;
            bytes[at..at + 2].copy_from_slice(&bad.to_le_bytes());
            std::fs::write(&p, bytes).unwrap();
            let e = Bundle::open(&dir).err().unwrap().to_string();
            assert!(
                e.contains("tensor w.scales") && e.contains("scale 1"),
                "{e}"
            );
        }
    }

    #[test]
    fn damaged_files_are_named() {
        let out = tempfile::tempdir().unwrap();
        let dir = make(out.path());
        let cfg = dir.join("config.json");
        let mut bytes = std::fs::read(&cfg).unwrap();
        let nl = bytes.iter().position(|&c| c == b'\n').unwrap();
        bytes[nl] = b' ';
        std::fs::write(&cfg, &bytes).unwrap();
        let b = Bundle::open(&dir).unwrap();
        let e = b.verify_checksums().unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("sha256"), "{e}");
        bytes.push(b' ');
        std::fs::write(&cfg, &bytes).unwrap();
        let e = Bundle::open(&dir).err().unwrap().to_string();
        assert!(e.contains("config.json") && e.contains("size"), "{e}");
    }
}
