//! The source checkpoint of a conversion: its config, its memory-mapped weights, the
//! checks done before anything is written, and the files whose digests go into the
//! bundle metadata.

use crate::error::{ConvertError, Result};
use memmap2::{Advice, Mmap, UncheckedAdvice};
use q3vl_bundle::FileEntry;
use q3vl_model::layout::{self, LM_HEAD};
use q3vl_model::{Checkpoint, Qwen3VlConfig};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// The small files of a Hugging Face checkpoint the converter reads (when present).
pub const SIDE_FILES: [&str; 8] = [
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "model.safetensors.index.json",
];

/// A checked source checkpoint.
pub struct SourceCheckpoint {
    /// The folder.
    pub dir: PathBuf,
    /// Its config.
    pub config: Qwen3VlConfig,
    /// `config.json` as it is on disk (copied verbatim into the bundles).
    pub config_bytes: Vec<u8>,
    /// The mapped weights.
    pub weights: Checkpoint,
    /// Every file the conversion reads, relative to `dir`, sorted.
    pub files: Vec<String>,
}

impl SourceCheckpoint {
    /// Opens `dir` and checks, before anything is written: the config parses and is a
    /// Qwen3-VL config, every safetensors file is intact, every expected tensor is
    /// present with the shape the config implies and a float dtype, and no tensor
    /// outside the layout is present (a tied checkpoint's redundant `lm_head.weight`
    /// excepted).
    pub fn open(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config_bytes = q3vl_model::input::read_regular(&config_path)
            .map_err(|e| ConvertError::io(&config_path, e))?;
        let config = Qwen3VlConfig::from_dir(dir)?;
        let weights = Checkpoint::open(dir)?;
        let expected = layout::checkpoint_tensors(&config);
        weights.check(&expected)?;
        let known: HashSet<&str> = expected.iter().map(|s| s.name.as_str()).collect();
        for name in weights.names() {
            let redundant_head = name == LM_HEAD && config.tie_word_embeddings;
            if !known.contains(name) && !redundant_head {
                let file = weights
                    .info(name)
                    .map(|i| weights.files()[i.file].path.clone())
                    .unwrap_or_default();
                return Err(ConvertError::UnexpectedTensor {
                    name: name.into(),
                    file,
                });
            }
        }
        let mut files: Vec<String> = SIDE_FILES
            .iter()
            .filter(|f| dir.join(f).is_file())
            .map(|f| f.to_string())
            .collect();
        for f in weights.files() {
            let rel = f
                .path
                .strip_prefix(dir)
                .unwrap_or(&f.path)
                .to_string_lossy()
                .into_owned();
            files.push(rel);
        }
        files.sort();
        files.dedup();
        Ok(SourceCheckpoint {
            dir: dir.to_path_buf(),
            config,
            config_bytes,
            weights,
            files,
        })
    }

    /// Sizes of the source files (cheap; for matching an existing vision bundle).
    pub fn sizes(&self) -> Result<BTreeMap<String, u64>> {
        self.files
            .iter()
            .map(|f| {
                let p = self.dir.join(f);
                let len = std::fs::metadata(&p)
                    .map_err(|e| ConvertError::io(&p, e))?
                    .len();
                Ok((f.clone(), len))
            })
            .collect()
    }

    /// Whether the checkpoint stores `lm_head.weight`.
    pub fn has_head(&self) -> bool {
        self.weights.contains(LM_HEAD)
    }
}

/// sha256 and size of each file (relative to `dir`), polling `stop` between pieces
/// (`Err(Interrupted)` once it returns true).
///
/// Files are memory-mapped and hashed in 8 MiB windows, each dropped from the page
/// tables once hashed: no copy into a buffer (a full extra pass over 17 GB on the 8B),
/// and no growth of the resident set.
pub fn hash_files(
    dir: &Path,
    files: &[String],
    stop: &(dyn Fn() -> bool + Sync),
) -> Result<BTreeMap<String, FileEntry>> {
    const WINDOW: usize = 8 << 20;
    let mut out = BTreeMap::new();
    for rel in files {
        let path = dir.join(rel);
        let f = q3vl_model::input::open_regular(&path).map_err(|e| ConvertError::io(&path, e))?;
        let len = f.metadata().map_err(|e| ConvertError::io(&path, e))?.len() as usize;
        let mut h = Sha256::new();
        if len > 0 {
            // SAFETY: a read-only map of a file the conversion only reads; a file
            // truncated underneath would fault, as with any mmap reader.
            let map = unsafe { Mmap::map(&f) }.map_err(|e| ConvertError::io(&path, e))?;
            let _ = map.advise(Advice::Sequential);
            let mut at = 0;
            while at < len {
                if stop() {
                    return Err(ConvertError::Interrupted);
                }
                let end = (at + WINDOW).min(len);
                h.update(&map[at..end]);
                // SAFETY: a shared read-only file mapping; the window is not used again
                // and re-faults from the page cache if it were.
                let _ =
                    unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, at, end - at) };
                at = end;
            }
        }
        out.insert(
            rel.clone(),
            FileEntry {
                sha256: hex::encode(h.finalize()),
                size: len as u64,
            },
        );
    }
    Ok(out)
}
