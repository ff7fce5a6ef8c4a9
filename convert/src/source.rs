//! The source checkpoint of a conversion: its config, its memory-mapped weights, the
//! checks done before anything is written, and the files whose digests go into the
//! bundle metadata.

use crate::error::{ConvertError, Result};
use q3vl_bundle::FileEntry;
use q3vl_model::layout::{self, LM_HEAD};
use q3vl_model::{Checkpoint, Qwen3VlConfig};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::io::Read;
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
        let config_bytes =
            std::fs::read(&config_path).map_err(|e| ConvertError::io(&config_path, e))?;
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

/// sha256 and size of each file (relative to `dir`), read sequentially with plain
/// reads (no mapping, so no resident-set growth), polling `stop` between pieces
/// (`Err(Interrupted)` once it returns true).
pub fn hash_files(
    dir: &Path,
    files: &[String],
    stop: &(dyn Fn() -> bool + Sync),
) -> Result<BTreeMap<String, FileEntry>> {
    let mut out = BTreeMap::new();
    let mut buf = vec![0u8; 8 << 20];
    for rel in files {
        let path = dir.join(rel);
        let mut f = std::fs::File::open(&path).map_err(|e| ConvertError::io(&path, e))?;
        let mut h = Sha256::new();
        let mut size = 0u64;
        loop {
            if stop() {
                return Err(ConvertError::Interrupted);
            }
            let n = f.read(&mut buf).map_err(|e| ConvertError::io(&path, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            size += n as u64;
        }
        out.insert(
            rel.clone(),
            FileEntry {
                sha256: hex::encode(h.finalize()),
                size,
            },
        );
    }
    Ok(out)
}
