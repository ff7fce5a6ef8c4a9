//! Safetensors checkpoints, single-file or sharded, memory-mapped and read tensor by
//! tensor. Values are widened exactly to f32 from bf16, f16 or f32.

use crate::error::{Error, Result};
use crate::layout::TensorSpec;
use memmap2::Mmap;
use safetensors::tensor::Dtype;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where one tensor lives.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Index into [`Checkpoint::files`].
    pub file: usize,
    /// Element type on disk.
    pub dtype: Dtype,
    /// Shape on disk.
    pub shape: Vec<usize>,
    /// Byte range inside the file (absolute offsets).
    pub range: std::ops::Range<usize>,
}

/// One memory-mapped safetensors file.
pub struct MappedFile {
    /// The file's path.
    pub path: PathBuf,
    map: Mmap,
}

/// A set of safetensors files read as one name → tensor map.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<MappedFile>,
    tensors: BTreeMap<String, TensorInfo>,
    /// Every `(name, range)` [`Checkpoint::release`] was asked to drop: lets tests see
    /// that a reader gives back what it read without measuring the resident set.
    #[cfg(test)]
    released: std::sync::Mutex<Vec<(String, std::ops::Range<usize>)>>,
}

impl Checkpoint {
    /// Opens `DIR/model.safetensors.index.json` (sharded) or `DIR/model.safetensors`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            let v = crate::config::read_json(&index)?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::Json {
                    path: index.clone(),
                    msg: "weight_map is missing".into(),
                })?;
            let mut shards = Vec::with_capacity(map.len());
            for (name, shard) in map {
                // A shard is a file of this folder: a name reaching outside it
                // (`../x`, `/etc/passwd`) is refused, not opened.
                match shard.as_str() {
                    Some(f) if crate::input::is_inner_path(f) => shards.push(f.to_owned()),
                    _ => {
                        return Err(Error::Json {
                            path: index.clone(),
                            msg: format!(
                                "weight_map: tensor {name} names {shard}, not a file inside this folder"
                            ),
                        })
                    }
                }
            }
            shards.sort();
            shards.dedup();
            let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
            let ck = Self::open_files(dir, &paths)?;
            // Every name the index promises must be where it says.
            for (name, shard) in map {
                let want = shard.as_str().unwrap_or_default();
                match ck.tensors.get(name) {
                    Some(info) if ck.files[info.file].path.ends_with(want) => {}
                    Some(_) => {
                        return Err(Error::Json {
                            path: index.clone(),
                            msg: format!("tensor {name} is not in {want}"),
                        })
                    }
                    None => {
                        return Err(Error::Json {
                            path: index.clone(),
                            msg: format!("tensor {name} listed in {want} is absent from it"),
                        })
                    }
                }
            }
            Ok(ck)
        } else {
            let single = dir.join("model.safetensors");
            if !single.exists() {
                return Err(Error::io(
                    &single,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "no model.safetensors or model.safetensors.index.json in this folder",
                    ),
                ));
            }
            Self::open_files(dir, &[single])
        }
    }

    /// Opens an explicit list of safetensors files as one checkpoint.
    pub fn open_files(dir: &Path, paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut tensors = BTreeMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let f = crate::input::open_regular(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the map is read-only; a file truncated under us is a user error
            // that can fault, as with any mmap reader (safetensors, llama.cpp).
            let map = unsafe { Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
            for (name, info) in parse_header(path, &map)? {
                let info = TensorInfo { file: fi, ..info };
                if tensors.insert(name.clone(), info).is_some() {
                    return Err(Error::Safetensors {
                        path: path.clone(),
                        msg: format!("tensor {name} appears in more than one file"),
                    });
                }
            }
            files.push(MappedFile {
                path: path.clone(),
                map,
            });
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files,
            tensors,
            #[cfg(test)]
            released: Default::default(),
        })
    }

    /// The checkpoint's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The mapped files, in the order [`TensorInfo::file`] indexes.
    pub fn files(&self) -> &[MappedFile] {
        &self.files
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Where a tensor lives, if present.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// Whether a tensor is present.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The raw bytes of a tensor, as stored.
    pub fn bytes(&self, name: &str) -> Result<(&TensorInfo, &[u8])> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::MissingTensor { name: name.into() })?;
        Ok((info, &self.files[info.file].map[info.range.clone()]))
    }

    /// A tensor widened to f32 (exact for bf16 and f16), row-major.
    pub fn f32(&self, name: &str) -> Result<Vec<f32>> {
        let (info, bytes) = self.bytes(name)?;
        widen(name, info.dtype, bytes)
    }

    /// A tensor widened to f32, after checking it has `shape`.
    pub fn f32_shaped(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.check_shape(name, shape)?;
        self.f32(name)
    }

    /// A tensor as a candle f32 tensor on the CPU, after checking its shape.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<candle_core::Tensor> {
        let v = self.f32_shaped(name, shape)?;
        Ok(candle_core::Tensor::from_vec(
            v,
            shape,
            &candle_core::Device::Cpu,
        )?)
    }

    /// Checks a tensor's presence and shape.
    pub fn check_shape(&self, name: &str, shape: &[usize]) -> Result<()> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::MissingTensor { name: name.into() })?;
        if info.shape != shape {
            return Err(Error::Shape {
                name: name.into(),
                expected: shape.to_vec(),
                found: info.shape.clone(),
            });
        }
        Ok(())
    }

    /// Checks presence, shape and a floating dtype for every expected tensor.
    pub fn check(&self, specs: &[TensorSpec]) -> Result<()> {
        for s in specs {
            self.check_shape(&s.name, &s.shape)?;
            let dt = self.tensors[&s.name].dtype;
            if !matches!(dt, Dtype::BF16 | Dtype::F16 | Dtype::F32) {
                return Err(Error::Dtype {
                    name: s.name.clone(),
                    dtype: format!("{dt:?}"),
                    expected: "BF16, F16 or F32".into(),
                });
            }
        }
        Ok(())
    }
}

/// Page-cache hints for streaming readers (the converter): they keep a pass over a
/// checkpoint larger than RAM from growing the process's resident set.
impl Checkpoint {
    /// Asks for 2 MiB pages for every mapped file (Linux `MADV_HUGEPAGE`; best
    /// effort, elsewhere nothing): a reader that streams all of its weights once per
    /// token wants each 2 MiB read through one TLB entry. Pages read from disk after
    /// this land in 2 MiB page-cache folios mapped whole; pages already cached stay
    /// as they are. Measured on a 2-core Xeon host over 2 GiB of a mapped 8B
    /// bundle: a plain sum read 25.3 GB/s with 9% of the range mapped by 2 MiB
    /// entries and 34.8 GB/s with all of it, after evicting the file and mapping it
    /// with this advice.
    pub fn advise_huge_pages(&self) {
        #[cfg(target_os = "linux")]
        for f in &self.files {
            let _ = f.map.advise(memmap2::Advice::HugePage);
        }
    }

    /// How much of this checkpoint's mapped files is resident, and how much of that is
    /// mapped by 2 MiB entries (`Rss` and `FilePmdMapped` of `/proc/self/smaps`), in
    /// bytes; `None` where smaps cannot be read. Whether a streaming reader gets 2 MiB
    /// entries depends on how its pages entered the page cache (see
    /// [`Checkpoint::advise_huge_pages`]), so benchmarks report it.
    pub fn resident_huge_bytes(&self) -> Option<(u64, u64)> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let starts: Vec<usize> = self.files.iter().map(|f| f.map.as_ptr() as usize).collect();
        let (mut rss, mut huge) = (0u64, 0u64);
        let mut ours = false;
        for line in smaps.lines() {
            // A mapping's header: "start-end perms offset dev inode path".
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = first.split_once('-') {
                if let (Ok(a), Ok(_)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    ours = starts.contains(&a);
                    continue;
                }
            }
            if !ours {
                continue;
            }
            let kib = |field: &str| -> Option<u64> {
                line.strip_prefix(field)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            };
            if let Some(v) = kib("Rss:") {
                rss += v << 10;
            } else if let Some(v) = kib("FilePmdMapped:") {
                huge += v << 10;
            }
        }
        Some((rss, huge))
    }

    /// Asks the kernel to read `range` (bytes within tensor `name`) ahead.
    /// Hints are best effort: failures are ignored.
    pub fn prefetch(&self, name: &str, range: std::ops::Range<usize>) {
        if let Some((map, off, len)) = self.map_range(name, range) {
            let _ = map.advise_range(memmap2::Advice::WillNeed, off, len);
        }
    }

    /// Drops `range` (bytes within tensor `name`) from this process's page tables once
    /// read; the data stays in the page cache and re-faults from there if touched again.
    /// Without this, mapped pages a pass has read count towards its resident set.
    pub fn release(&self, name: &str, range: std::ops::Range<usize>) {
        #[cfg(test)]
        self.released
            .lock()
            .expect("not poisoned")
            .push((name.to_owned(), range.clone()));
        if let Some((map, off, len)) = self.map_range(name, range) {
            // SAFETY: the map is a read-only shared file mapping, so dropping its pages
            // loses nothing: a later access (a slice still held, or a neighbour's bytes
            // on a boundary page, which memmap2 rounds in) faults the page back in from
            // the page cache.
            let advice = memmap2::UncheckedAdvice::DontNeed;
            let _ = unsafe { map.unchecked_advise_range(advice, off, len) };
        }
    }

    /// [`Checkpoint::release`] of a whole tensor.
    pub fn release_tensor(&self, name: &str) {
        if let Some(info) = self.tensors.get(name) {
            self.release(name, 0..info.range.len());
        }
    }

    /// The ranges released so far, in call order (tests only).
    #[cfg(test)]
    pub(crate) fn released(&self) -> Vec<(String, std::ops::Range<usize>)> {
        self.released.lock().expect("not poisoned").clone()
    }

    fn map_range(
        &self,
        name: &str,
        range: std::ops::Range<usize>,
    ) -> Option<(&Mmap, usize, usize)> {
        let info = self.tensors.get(name)?;
        let start = info.range.start + range.start.min(info.range.len());
        let end = info.range.start + range.end.min(info.range.len());
        (end > start).then(|| (&self.files[info.file].map, start, end - start))
    }
}

/// Widens raw little-endian bytes of a floating dtype into `out` (exact), without
/// allocating; `out.len()` must be the element count of `bytes`.
#[inline(always)]
pub fn widen_into(name: &str, dtype: Dtype, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    match dtype {
        Dtype::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        Dtype::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        Dtype::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        other => {
            return Err(Error::Dtype {
                name: name.into(),
                dtype: format!("{other:?}"),
                expected: "BF16, F16 or F32".into(),
            })
        }
    }
    Ok(())
}

/// Parses a safetensors header, checking every tensor's bytes lie inside the file.
fn parse_header(path: &Path, buf: &[u8]) -> Result<Vec<(String, TensorInfo)>> {
    let bad = |msg: String| Error::Safetensors {
        path: path.to_path_buf(),
        msg,
    };
    if buf.len() < 8 {
        return Err(bad(format!(
            "file is {} bytes, too short for a safetensors header",
            buf.len()
        )));
    }
    let n = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes")) as usize;
    if n > buf.len() - 8 {
        return Err(bad(format!(
            "header length {n} points past the end of the file ({} bytes)",
            buf.len()
        )));
    }
    let header: serde_json::Value = serde_json::from_slice(&buf[8..8 + n])
        .map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    let obj = header
        .as_object()
        .ok_or_else(|| bad("header is not a JSON object".into()))?;
    let data = 8 + n;
    let mut out = Vec::new();
    for (name, v) in obj {
        if name == "__metadata__" {
            continue;
        }
        let info = parse_entry(name, v, data..buf.len()).map_err(bad)?;
        out.push((name.clone(), info));
    }
    check_tiling(&out, data..buf.len()).map_err(bad)?;
    Ok(out)
}

/// One header entry: its dtype, shape and byte range, checked against each other and
/// against `data`, the file's data section (absolute offsets); the error is the
/// message, naming the tensor.
fn parse_entry(
    name: &str,
    v: &serde_json::Value,
    data: std::ops::Range<usize>,
) -> std::result::Result<TensorInfo, String> {
    let dtype_s = v
        .get("dtype")
        .and_then(|x| x.as_str())
        .ok_or_else(|| format!("tensor {name}: no dtype"))?;
    let dtype =
        parse_dtype(dtype_s).ok_or_else(|| format!("tensor {name}: unknown dtype {dtype_s}"))?;
    let shape: Vec<usize> = v
        .get("shape")
        .and_then(|x| x.as_array())
        .ok_or_else(|| format!("tensor {name}: no shape"))?
        .iter()
        .map(|x| x.as_u64().map(|x| x as usize))
        .collect::<Option<_>>()
        .ok_or_else(|| format!("tensor {name}: bad shape"))?;
    let offs: Vec<usize> = v
        .get("data_offsets")
        .and_then(|x| x.as_array())
        .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
        .ok_or_else(|| format!("tensor {name}: bad data_offsets"))?;
    if offs.len() != 2 || offs[0] > offs[1] {
        return Err(format!("tensor {name}: bad data_offsets {offs:?}"));
    }
    let want = shape
        .iter()
        .try_fold(dtype.bitsize() / 8, |n, &d| n.checked_mul(d))
        .ok_or_else(|| format!("tensor {name}: shape {shape:?} is too large"))?;
    if offs[1] - offs[0] != want {
        return Err(format!(
            "tensor {name}: {} bytes for shape {shape:?} {dtype_s} (needs {want})",
            offs[1] - offs[0]
        ));
    }
    // Checked: offsets near 2^64 must not wrap around into the file.
    if offs[1] > data.len() {
        return Err(format!(
            "truncated: tensor {name} ends at byte {} but the file has {}",
            data.start as u128 + offs[1] as u128,
            data.end
        ));
    }
    Ok(TensorInfo {
        file: 0,
        dtype,
        shape,
        range: data.start + offs[0]..data.start + offs[1],
    })
}

/// The safetensors format requires the tensors to tile the data section exactly:
/// no two overlap (one write would change both) and no bytes lie between or after
/// them. The `safetensors` crate checks this (`Metadata::validate`), but this reader
/// parses headers itself to name every tensor in its errors, so it checks too.
fn check_tiling(
    tensors: &[(String, TensorInfo)],
    data: std::ops::Range<usize>,
) -> std::result::Result<(), String> {
    let mut by_start: Vec<(&str, &std::ops::Range<usize>)> = tensors
        .iter()
        .map(|(n, t)| (n.as_str(), &t.range))
        .collect();
    by_start.sort_by_key(|(n, r)| (r.start, r.end, *n));
    let mut at = data.start;
    let mut prev = "the header";
    for (name, r) in by_start {
        if r.start < at {
            return Err(format!(
                "tensor {name} overlaps {prev} (the format forbids overlapping tensors)"
            ));
        }
        if r.start > at {
            return Err(format!(
                "{} unused bytes before tensor {name} (the format forbids gaps between tensors)",
                r.start - at
            ));
        }
        at = r.end;
        prev = name;
    }
    if at != data.end {
        return Err(format!(
            "{} bytes after the last tensor ({prev}) belong to no tensor",
            data.end - at
        ));
    }
    Ok(())
}

fn parse_dtype(s: &str) -> Option<Dtype> {
    Some(match s {
        "BOOL" => Dtype::BOOL,
        "U8" => Dtype::U8,
        "I8" => Dtype::I8,
        "I16" => Dtype::I16,
        "U16" => Dtype::U16,
        "F16" => Dtype::F16,
        "BF16" => Dtype::BF16,
        "I32" => Dtype::I32,
        "U32" => Dtype::U32,
        "F32" => Dtype::F32,
        "F64" => Dtype::F64,
        "I64" => Dtype::I64,
        "U64" => Dtype::U64,
        _ => return None,
    })
}

/// Widens raw little-endian bytes of a floating dtype to f32, exactly.
pub fn widen(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect(),
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        other => {
            return Err(Error::Dtype {
                name: name.into(),
                dtype: format!("{other:?}"),
                expected: "BF16, F16 or F32".into(),
            })
        }
    })
}

/// The first non-finite value of a tensor, as an error naming it.
pub fn check_finite(name: &str, values: &[f32]) -> Result<()> {
    match values.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(index) => Err(Error::NonFinite {
            name: name.into(),
            index,
            value: values[index],
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn write(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn resident_bytes_of_the_maps_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let n = 256 << 10;
        let bytes: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        write(
            &dir.path().join("model.safetensors"),
            &[("w", Dtype::U8, vec![n], bytes)],
        );
        let c = Checkpoint::open(dir.path()).unwrap();
        let (_, b) = c.bytes("w").unwrap();
        let sum: u64 = b.iter().step_by(4096).map(|&v| v as u64).sum();
        assert!(sum > 0);
        let (rss, huge) = c.resident_huge_bytes().unwrap();
        // Every page of the tensor was read through this process's map.
        assert!(rss >= n as u64, "rss {rss}");
        assert!(huge <= rss);
        // Nothing of another mapping is counted: the map is under 1 MiB.
        assert!(rss < 1 << 20, "rss {rss}");
    }

    #[test]
    fn widening_is_exact_and_sharding_is_transparent() {
        let dir = tempfile::tempdir().unwrap();
        let bf: Vec<u8> = [1.5f32, -2.0, 3.25]
            .iter()
            .flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes())
            .collect();
        let h: Vec<u8> = [0.5f32, 65504.0]
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes())
            .collect();
        write(
            &dir.path().join("a.safetensors"),
            &[("x", Dtype::BF16, vec![3], bf)],
        );
        write(
            &dir.path().join("b.safetensors"),
            &[("y", Dtype::F16, vec![2], h)],
        );
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}"#,
        )
        .unwrap();
        let ck = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(ck.f32("x").unwrap(), vec![1.5, -2.0, 3.25]);
        assert_eq!(ck.f32_shaped("y", &[2]).unwrap(), vec![0.5, 65504.0]);
        let e = ck.f32_shaped("y", &[3]).unwrap_err().to_string();
        assert!(e.contains("tensor y") && e.contains("[3]"), "{e}");
        assert!(ck.f32("z").unwrap_err().to_string().contains("tensor z"));
    }

    #[test]
    fn damaged_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.safetensors");
        write(&p, &[("x", Dtype::F32, vec![4], vec![0u8; 16])]);
        let full = std::fs::read(&p).unwrap();
        std::fs::write(&p, &full[..full.len() - 4]).unwrap();
        let e = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("truncated"),
            "{e}"
        );
        let mut bad = full.clone();
        bad[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        std::fs::write(&p, &bad).unwrap();
        let e = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("past the end"), "{e}");
        let mut bad = full.clone();
        bad[8] = b'!';
        std::fs::write(&p, &bad).unwrap();
        let e = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("not valid JSON"), "{e}");
    }

    /// A safetensors file from a raw header (padded to 8 bytes) and data section.
    fn raw_file(path: &Path, header: &str, data: &[u8]) {
        let mut h = header.as_bytes().to_vec();
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
        bytes.extend(h);
        bytes.extend(data);
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn overlaps_and_gaps_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.safetensors");
        let open = |header: &str, len: usize| {
            raw_file(&p, header, &vec![0u8; len]);
            Checkpoint::open(dir.path()).err().map(|e| e.to_string())
        };
        let ok = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#;
        assert_eq!(open(ok, 12), None);
        let overlap = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
        let e = open(overlap, 12).unwrap();
        assert!(
            e.contains("model.safetensors") && e.contains("tensor b overlaps a"),
            "{e}"
        );
        let gap = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#;
        let e = open(gap, 12).unwrap();
        assert!(e.contains("4 unused bytes before tensor b"), "{e}");
        let e = open(ok, 16).unwrap();
        assert!(e.contains("4 bytes after the last tensor (b)"), "{e}");
        let huge = r#"{"a":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,8]}}"#;
        assert!(open(huge, 8).unwrap().contains("too large"));
        let wrap = r#"{"a":{"dtype":"U8","shape":[5],"data_offsets":[18446744073709551610,18446744073709551615]}}"#;
        assert!(open(wrap, 8).unwrap().contains("truncated"));
    }

    #[test]
    fn index_entries_stay_in_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("a.safetensors"),
            &[("x", Dtype::F32, vec![1], vec![0u8; 4])],
        );
        for shard in ["../a.safetensors", "/etc/passwd"] {
            let index = format!(r#"{{"weight_map": {{"x": "{shard}"}}}}"#);
            std::fs::write(dir.path().join("model.safetensors.index.json"), index).unwrap();
            let e = Checkpoint::open(dir.path()).err().unwrap().to_string();
            assert!(
                e.contains("model.safetensors.index.json")
                    && e.contains("tensor x")
                    && e.contains(shard),
                "{e}"
            );
        }
    }

    #[test]
    fn non_finite_is_located() {
        let e = check_finite("w", &[0.0, 1.0, f32::NAN])
            .unwrap_err()
            .to_string();
        assert!(e.contains("tensor w") && e.contains("index 2"), "{e}");
    }
}
