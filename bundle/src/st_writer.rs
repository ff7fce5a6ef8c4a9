//! A streaming safetensors writer: the header is computed up front from the plan (every
//! name, dtype and shape is known before any value is), then tensor bytes are streamed
//! to disk as the caller produces them, so memory stays bounded by the chunks in flight
//! rather than by the model (the `safetensors` crate's `serialize` needs every tensor in
//! memory at once).
//!
//! Layout of each file, chosen so every tensor is naturally aligned for zero-copy use:
//! all F32 tensors first, then the 2-byte tensors, then each int8 weight immediately
//! followed by its `.scales`. The data section starts 8-aligned; F32 sizes are multiples
//! of 4 and int8 weights multiples of 32 (their `in` is), so nothing after them shifts.
//!
//! Files are written by a background thread that also hashes them, so hashing and disk
//! writes overlap with the caller's compute; the bytes bypass the page cache where the
//! file system allows ([`DirectFile`]). A tensor written out of stream order (a
//! weight's scales, produced chunk by chunk with the weight) is held in memory until the
//! stream reaches it; callers keep that to the small scales tensors.

use crate::direct_file::DirectFile;
use crate::error::BundleError;
use crate::metadata::FileEntry;
use crate::names::{scales_name, shard_file, INDEX_FILE, SINGLE_WEIGHTS_FILE};
use crate::Dtype;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// One tensor to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorPlan {
    /// Its name in the file.
    pub name: String,
    /// Its element type.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<usize>,
}

impl TensorPlan {
    /// A plan entry.
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: Vec<usize>) -> Self {
        TensorPlan {
            name: name.into(),
            dtype,
            shape,
        }
    }

    /// Bytes of its data.
    pub fn bytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * self.dtype.size() as u64
    }
}

/// How tensors are split into files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardPolicy {
    /// A new shard starts when the next tensor would take the current one past this
    /// many data bytes (a single larger tensor gets a shard of its own).
    pub max_shard_bytes: u64,
}

impl ShardPolicy {
    /// About 4 GiB per shard, like the hub's checkpoints.
    pub const DEFAULT_SHARD_BYTES: u64 = 4 << 30;
}

impl Default for ShardPolicy {
    fn default() -> Self {
        ShardPolicy {
            max_shard_bytes: Self::DEFAULT_SHARD_BYTES,
        }
    }
}

/// A file the writer produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenFile {
    /// Its name inside the folder.
    pub file: String,
    /// Its size and sha256.
    pub entry: FileEntry,
}

struct Slot {
    plan: TensorPlan,
    len: u64,
    received: u64,
    /// Bytes received before the stream reached this tensor.
    pending: Vec<u8>,
}

struct Shard {
    file: String,
    header: Vec<u8>,
    slots: Vec<Slot>,
}

/// Writes one file on a background thread, hashing what it writes.
struct Stream {
    path: PathBuf,
    tx: Option<SyncSender<Vec<u8>>>,
    handle: Option<JoinHandle<Result<FileEntry, BundleError>>>,
    /// Set when the file is being thrown away (error, Ctrl-C): skip the fsync, which
    /// could otherwise keep an interrupted run waiting on gigabytes of dirty pages.
    abandoned: Arc<AtomicBool>,
}

impl Stream {
    /// Chunks in flight between the caller and the disk (each a few MiB at most).
    const DEPTH: usize = 4;

    fn open(path: PathBuf) -> Result<Stream, BundleError> {
        let mut file = DirectFile::create(&path).map_err(|e| BundleError::io(&path, e))?;
        let (tx, rx) = sync_channel::<Vec<u8>>(Self::DEPTH);
        let p = path.clone();
        let abandoned = Arc::new(AtomicBool::new(false));
        let skip_sync = abandoned.clone();
        let handle = std::thread::Builder::new()
            .name("q3vl-write".into())
            .spawn(move || {
                let mut h = Sha256::new();
                // On a write error the thread returns at once; dropping the receiver
                // makes the caller's next send fail, and the caller then joins here.
                for chunk in rx {
                    h.update(&chunk);
                    file.write_all(&chunk).map_err(|e| BundleError::io(&p, e))?;
                }
                let size = file
                    .finish(!skip_sync.load(Ordering::SeqCst))
                    .map_err(|e| BundleError::io(&p, e))?;
                Ok(FileEntry {
                    sha256: hex::encode(h.finalize()),
                    size,
                })
            })
            .map_err(|e| BundleError::io(&path, e))?;
        Ok(Stream {
            path,
            tx: Some(tx),
            handle: Some(handle),
            abandoned,
        })
    }

    fn send(&mut self, chunk: Vec<u8>) -> Result<(), BundleError> {
        if chunk.is_empty() {
            return Ok(());
        }
        let tx = self.tx.as_ref().expect("stream open");
        if tx.send(chunk).is_err() {
            // The thread stopped: its result says why.
            return match self.join() {
                Err(e) => Err(e),
                Ok(_) => Err(BundleError::Write {
                    path: self.path.clone(),
                    msg: "writer thread stopped early".into(),
                }),
            };
        }
        Ok(())
    }

    fn join(&mut self) -> Result<FileEntry, BundleError> {
        self.tx = None;
        match self.handle.take() {
            Some(h) => h.join().unwrap_or_else(|_| {
                Err(BundleError::Write {
                    path: self.path.clone(),
                    msg: "writer thread panicked".into(),
                })
            }),
            None => Err(BundleError::Write {
                path: self.path.clone(),
                msg: "file already closed".into(),
            }),
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.handle.is_some() {
            self.abandoned.store(true, Ordering::SeqCst);
            let _ = self.join();
        }
    }
}

/// Streams a set of tensors into one safetensors file or a set of shards plus
/// `model.safetensors.index.json`, with bounded memory.
///
/// Feed every tensor's bytes with [`WeightsWriter::write`] (in pieces, in row-major
/// order within a tensor); produce tensors in [`WeightsWriter::order`] to keep memory
/// flat. Then call [`WeightsWriter::finish`].
pub struct WeightsWriter {
    dir: PathBuf,
    shards: Vec<Shard>,
    index: HashMap<String, (usize, usize)>,
    cur_shard: usize,
    cur_slot: usize,
    stream: Option<Stream>,
    /// Completed files still being synced by their threads (joined in `finish`, so a
    /// shard's fsync overlaps the next shard's conversion).
    closing: Vec<(String, Stream)>,
}

impl WeightsWriter {
    /// Plans the files for `plan` inside `dir` and opens the first one.
    /// `st_metadata` becomes the safetensors `__metadata__` of every file.
    pub fn create(
        dir: &Path,
        plan: &[TensorPlan],
        policy: ShardPolicy,
        st_metadata: &BTreeMap<String, String>,
    ) -> Result<Self, BundleError> {
        let mut seen = HashMap::new();
        for (i, t) in plan.iter().enumerate() {
            if seen.insert(t.name.clone(), i).is_some() {
                return Err(BundleError::Write {
                    path: dir.to_path_buf(),
                    msg: format!("tensor {} is planned twice", t.name),
                });
            }
        }
        let groups = assign_shards(plan, policy);
        let n = groups.len();
        let mut shards = Vec::with_capacity(n);
        let mut index = HashMap::new();
        for (si, members) in groups.into_iter().enumerate() {
            let file = if n == 1 {
                SINGLE_WEIGHTS_FILE.to_string()
            } else {
                shard_file(si, n)
            };
            let ordered = file_order(plan, &members);
            let (header, _) = header_bytes(plan, &ordered, st_metadata);
            let slots: Vec<Slot> = ordered
                .iter()
                .map(|&i| Slot {
                    plan: plan[i].clone(),
                    len: plan[i].bytes(),
                    received: 0,
                    pending: Vec::new(),
                })
                .collect();
            for (k, s) in slots.iter().enumerate() {
                index.insert(s.plan.name.clone(), (si, k));
            }
            shards.push(Shard {
                file,
                header,
                slots,
            });
        }
        let mut w = WeightsWriter {
            dir: dir.to_path_buf(),
            shards,
            index,
            cur_shard: 0,
            cur_slot: 0,
            stream: None,
            closing: Vec::new(),
        };
        w.settle()?;
        Ok(w)
    }

    /// Every tensor name in the order the files hold them; producing tensors in this
    /// order streams them straight to disk (a weight's `.scales` may come with it).
    pub fn order(&self) -> Vec<&str> {
        self.shards
            .iter()
            .flat_map(|s| s.slots.iter().map(|t| t.plan.name.as_str()))
            .collect()
    }

    /// The file each tensor lands in (name → file name).
    pub fn weight_map(&self) -> BTreeMap<String, String> {
        self.shards
            .iter()
            .flat_map(|s| {
                s.slots
                    .iter()
                    .map(|t| (t.plan.name.clone(), s.file.clone()))
            })
            .collect()
    }

    /// Appends `bytes` to tensor `name`.
    pub fn write(&mut self, name: &str, bytes: Vec<u8>) -> Result<(), BundleError> {
        let &(si, k) = self.index.get(name).ok_or_else(|| BundleError::Write {
            path: self.dir.clone(),
            msg: format!("tensor {name} is not in the plan"),
        })?;
        let path = self.dir.join(&self.shards[si].file);
        let slot = &mut self.shards[si].slots[k];
        if slot.received + bytes.len() as u64 > slot.len {
            return Err(BundleError::Write {
                path,
                msg: format!(
                    "tensor {name}: {} bytes written, more than its {} ({:?} {:?})",
                    slot.received + bytes.len() as u64,
                    slot.len,
                    slot.plan.dtype,
                    slot.plan.shape
                ),
            });
        }
        slot.received += bytes.len() as u64;
        if (si, k) == (self.cur_shard, self.cur_slot) {
            self.stream.as_mut().expect("stream open").send(bytes)?;
            self.settle()
        } else {
            slot.pending.extend_from_slice(&bytes);
            Ok(())
        }
    }

    /// Moves the stream past every complete tensor, flushing held bytes and closing
    /// and opening files as it goes.
    fn settle(&mut self) -> Result<(), BundleError> {
        while self.cur_shard < self.shards.len() {
            if self.stream.is_none() {
                let shard = &self.shards[self.cur_shard];
                let mut s = Stream::open(self.dir.join(&shard.file))?;
                s.send(shard.header.clone())?;
                self.stream = Some(s);
            }
            let shard = &mut self.shards[self.cur_shard];
            if self.cur_slot == shard.slots.len() {
                let mut stream = self.stream.take().expect("stream open");
                stream.tx = None; // end of data: the thread flushes and syncs
                self.closing.push((shard.file.clone(), stream));
                self.cur_shard += 1;
                self.cur_slot = 0;
                continue;
            }
            let slot = &mut shard.slots[self.cur_slot];
            if !slot.pending.is_empty() {
                let held = std::mem::take(&mut slot.pending);
                self.stream.as_mut().expect("stream open").send(held)?;
            }
            if slot.received == slot.len {
                self.cur_slot += 1;
            } else {
                break;
            }
        }
        Ok(())
    }

    /// Checks every tensor is complete, closes the last file, writes the index of a
    /// sharded set, and returns every file with its size and sha256.
    pub fn finish(mut self) -> Result<Vec<WrittenFile>, BundleError> {
        self.settle()?;
        if let Some(shard) = self.shards.get(self.cur_shard) {
            let slot = &shard.slots[self.cur_slot.min(shard.slots.len() - 1)];
            return Err(BundleError::Write {
                path: self.dir.join(&shard.file),
                msg: format!(
                    "tensor {}: only {} of {} bytes were written",
                    slot.plan.name, slot.received, slot.len
                ),
            });
        }
        let mut files = Vec::with_capacity(self.closing.len() + 1);
        for (file, mut stream) in std::mem::take(&mut self.closing) {
            files.push(WrittenFile {
                file,
                entry: stream.join()?,
            });
        }
        if self.shards.len() > 1 {
            let total: u64 = self
                .shards
                .iter()
                .flat_map(|s| s.slots.iter().map(|t| t.len))
                .sum();
            let v = serde_json::json!({
                "metadata": {"total_size": total},
                "weight_map": self.weight_map(),
            });
            let mut bytes = serde_json::to_vec_pretty(&v).expect("index serializes");
            bytes.push(b'\n');
            let path = self.dir.join(INDEX_FILE);
            let entry = write_synced(&path, &bytes)?;
            files.push(WrittenFile {
                file: INDEX_FILE.into(),
                entry,
            });
        }
        Ok(files)
    }
}

/// Writes a small file and fsyncs it, returning its size and sha256.
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<FileEntry, BundleError> {
    let mut f = std::fs::File::create(path).map_err(|e| BundleError::io(path, e))?;
    f.write_all(bytes).map_err(|e| BundleError::io(path, e))?;
    f.sync_all().map_err(|e| BundleError::io(path, e))?;
    Ok(FileEntry {
        sha256: hex::encode(Sha256::digest(bytes)),
        size: bytes.len() as u64,
    })
}

/// Splits the plan into shards: in plan order, a new shard when the next unit would
/// pass the limit; a weight and its `.scales` (adjacent in the plan) are one unit.
fn assign_shards(plan: &[TensorPlan], policy: ShardPolicy) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut bytes = 0u64;
    let mut i = 0;
    while i < plan.len() {
        let paired = plan
            .get(i + 1)
            .is_some_and(|n| n.name == scales_name(&plan[i].name));
        let unit: Vec<usize> = if paired { vec![i, i + 1] } else { vec![i] };
        let ub: u64 = unit.iter().map(|&j| plan[j].bytes()).sum();
        let cur = shards.last_mut().expect("one shard");
        if !cur.is_empty() && bytes + ub > policy.max_shard_bytes {
            shards.push(Vec::new());
            bytes = 0;
        }
        bytes += ub;
        shards.last_mut().expect("one shard").extend(unit);
        i += if paired { 2 } else { 1 };
    }
    shards
}

/// The order of one file's tensors: 8-byte, then 4-byte, then 2-byte dtypes, then int8
/// weights each followed by its scales (so every tensor starts aligned to its element
/// size); plan order within each group.
fn file_order(plan: &[TensorPlan], members: &[usize]) -> Vec<usize> {
    let names: HashMap<&str, usize> = members
        .iter()
        .map(|&i| (plan[i].name.as_str(), i))
        .collect();
    let rank = |i: usize| -> (u8, usize) {
        let t = &plan[i];
        match t.dtype {
            Dtype::I64 => (0, i),
            Dtype::F32 | Dtype::I32 => (1, i),
            Dtype::I8 => (3, i),
            Dtype::F16 | Dtype::BF16 => {
                // A scales tensor sorts right after its weight.
                match t
                    .name
                    .strip_suffix(crate::names::SCALES_SUFFIX)
                    .and_then(|base| names.get(base))
                    .filter(|&&b| plan[b].dtype == Dtype::I8)
                {
                    Some(&b) => (3, b),
                    None => (2, i),
                }
            }
        }
    };
    let mut order = members.to_vec();
    order.sort_by_key(|&i| (rank(i), i));
    order
}

/// The 8-byte length prefix plus the JSON header (padded with spaces so the data
/// starts 8-aligned); also returns each tensor's data offsets.
fn header_bytes(
    plan: &[TensorPlan],
    ordered: &[usize],
    st_metadata: &BTreeMap<String, String>,
) -> (Vec<u8>, Vec<(u64, u64)>) {
    // Keys are emitted in sorted order by hand, whatever serde_json's map type is.
    let mut entries: BTreeMap<&str, String> = BTreeMap::new();
    let mut offsets = Vec::with_capacity(ordered.len());
    let mut at = 0u64;
    for &i in ordered {
        let t = &plan[i];
        let end = at + t.bytes();
        entries.insert(
            &t.name,
            format!(
                "{{\"dtype\":\"{}\",\"shape\":{},\"data_offsets\":[{at},{end}]}}",
                t.dtype.as_str(),
                serde_json::to_string(&t.shape).expect("shape serializes")
            ),
        );
        offsets.push((at, end));
        at = end;
    }
    let mut json = String::from("{");
    let mut first = true;
    if !st_metadata.is_empty() {
        json.push_str("\"__metadata__\":{");
        for (k, (key, v)) in st_metadata.iter().enumerate() {
            if k > 0 {
                json.push(',');
            }
            json.push_str(&serde_json::to_string(key).expect("string"));
            json.push(':');
            json.push_str(&serde_json::to_string(v).expect("string"));
        }
        json.push('}');
        first = false;
    }
    for (name, v) in &entries {
        if !first {
            json.push(',');
        }
        first = false;
        json.push_str(&serde_json::to_string(name).expect("string"));
        json.push(':');
        json.push_str(v);
    }
    json.push('}');
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    (out, offsets)
}

impl Drop for WeightsWriter {
    fn drop(&mut self) {
        // Stop the writer thread; the staging folder is removed by its owner.
        self.stream.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Vec<TensorPlan> {
        vec![
            TensorPlan::new("e", Dtype::F16, vec![3, 5]),
            TensorPlan::new("w", Dtype::I8, vec![2, 32]),
            TensorPlan::new("w.scales", Dtype::F16, vec![2, 1]),
            TensorPlan::new("n", Dtype::F32, vec![3]),
            TensorPlan::new("z", Dtype::F16, vec![0]),
        ]
    }

    fn fill(t: &TensorPlan) -> Vec<u8> {
        (0..t.bytes())
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(t.name.len() as u8))
            .collect()
    }

    #[test]
    fn files_are_valid_safetensors_aligned_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan();
        let mut w = WeightsWriter::create(dir.path(), &p, ShardPolicy::default(), &BTreeMap::new())
            .unwrap();
        assert_eq!(w.order(), vec!["n", "e", "z", "w", "w.scales"]);
        // Scales first (held), weight in two pieces, the rest in order.
        w.write("w.scales", fill(&p[2])).unwrap();
        w.write("n", fill(&p[3])).unwrap();
        let e = fill(&p[0]);
        w.write("e", e[..7].to_vec()).unwrap();
        w.write("e", e[7..].to_vec()).unwrap();
        let ww = fill(&p[1]);
        w.write("w", ww[..32].to_vec()).unwrap();
        w.write("w", ww[32..].to_vec()).unwrap();
        let files = w.finish().unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].file, "model.safetensors");
        let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        assert_eq!(files[0].entry.size, bytes.len() as u64);
        assert_eq!(files[0].entry.sha256, hex::encode(Sha256::digest(&bytes)));
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for t in &p {
            let v = st.tensor(&t.name).unwrap();
            assert_eq!(v.shape(), t.shape.as_slice());
            assert_eq!(v.data(), fill(t).as_slice(), "{}", t.name);
            let align = t.dtype.size();
            let off = v.data().as_ptr() as usize - bytes.as_ptr() as usize;
            assert_eq!(off % align, 0, "{} misaligned", t.name);
        }
    }

    #[test]
    fn shards_keep_scales_with_their_weight_and_write_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan();
        let policy = ShardPolicy {
            max_shard_bytes: 40,
        };
        let mut w = WeightsWriter::create(dir.path(), &p, policy, &BTreeMap::new()).unwrap();
        let map = w.weight_map();
        assert_eq!(map["w"], map["w.scales"]);
        for name in w.order().iter().map(|s| s.to_string()).collect::<Vec<_>>() {
            let t = p.iter().find(|t| t.name == name).unwrap();
            w.write(&name, fill(t)).unwrap();
        }
        let files = w.finish().unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.file.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "model-00001-of-00003.safetensors",
                "model-00002-of-00003.safetensors",
                "model-00003-of-00003.safetensors",
                "model.safetensors.index.json"
            ]
        );
        let ck = q3vl_model::Checkpoint::open(dir.path()).unwrap();
        for t in &p {
            assert_eq!(ck.bytes(&t.name).unwrap().1, fill(t).as_slice());
        }
    }

    #[test]
    fn short_and_long_writes_are_errors_naming_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan();
        let mut w = WeightsWriter::create(dir.path(), &p, ShardPolicy::default(), &BTreeMap::new())
            .unwrap();
        let e = w.write("n", vec![0; 13]).unwrap_err().to_string();
        assert!(e.contains("tensor n"), "{e}");
        w.write("n", vec![0; 12]).unwrap();
        let e = w.finish().unwrap_err().to_string();
        assert!(e.contains("tensor e") && e.contains("0 of 30"), "{e}");
        let e = WeightsWriter::create(
            dir.path(),
            &[p[0].clone(), p[0].clone()],
            ShardPolicy::default(),
            &BTreeMap::new(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("twice"), "{e}");
    }
}
