//! Staging and committing a bundle folder atomically.
//!
//! A bundle is written into a hidden staging folder `<out>/.q3vl-tmp-<name>` and only
//! renamed to `<out>/<name>` once every file is written and synced, so an interrupted
//! or failed run never leaves a folder that looks like a bundle. Dropping a writer (on
//! an error, or on Ctrl-C) removes its staging folder.

use crate::error::BundleError;
use crate::metadata::{FileEntry, Metadata};
use crate::names::{tmp_dir, METADATA_FILE, OLD_PREFIX};
use crate::st_writer::{write_synced, WrittenFile};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn sync_dir(dir: &Path) -> Result<(), BundleError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| BundleError::io(dir, e))
}

/// A bundle being written into its staging folder.
pub struct BundleWriter {
    out: PathBuf,
    name: String,
    tmp: PathBuf,
    files: BTreeMap<String, FileEntry>,
    keep: bool,
}

impl BundleWriter {
    /// Fails with [`BundleError::Exists`] when `out/name` already exists.
    pub fn ensure_absent(out: &Path, name: &str) -> Result<(), BundleError> {
        let target = out.join(name);
        if target.symlink_metadata().is_ok() {
            return Err(BundleError::Exists { path: target });
        }
        Ok(())
    }

    /// Starts bundle `out/name` in a fresh staging folder (a stale one from a killed
    /// run is removed first). Creates `out` if needed.
    pub fn create(out: &Path, name: &str) -> Result<Self, BundleError> {
        std::fs::create_dir_all(out).map_err(|e| BundleError::io(out, e))?;
        let tmp = out.join(tmp_dir(name));
        if tmp.symlink_metadata().is_ok() {
            std::fs::remove_dir_all(&tmp).map_err(|e| BundleError::io(&tmp, e))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| BundleError::io(&tmp, e))?;
        Ok(BundleWriter {
            out: out.to_path_buf(),
            name: name.into(),
            tmp,
            files: BTreeMap::new(),
            keep: false,
        })
    }

    /// The staging folder (where [`crate::WeightsWriter`] should write).
    pub fn dir(&self) -> &Path {
        &self.tmp
    }

    /// The bundle's folder name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the bundle will be once committed.
    pub fn target(&self) -> PathBuf {
        self.out.join(&self.name)
    }

    /// Writes a small file at `rel` (`/`-separated, sub-folders created), syncs it and
    /// records its size and sha256.
    pub fn add_file(&mut self, rel: &str, bytes: &[u8]) -> Result<(), BundleError> {
        let path = self.tmp.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| BundleError::io(parent, e))?;
        }
        let entry = write_synced(&path, bytes)?;
        self.files.insert(rel.into(), entry);
        Ok(())
    }

    /// Records files written into [`BundleWriter::dir`] by a [`crate::WeightsWriter`].
    pub fn record(&mut self, files: Vec<WrittenFile>) {
        for f in files {
            self.files.insert(f.file, f.entry);
        }
    }

    /// The files recorded so far.
    pub fn files(&self) -> &BTreeMap<String, FileEntry> {
        &self.files
    }

    /// Writes `metadata.json` (with the recorded files filled in), syncs the folder and
    /// returns the staged bundle, ready to commit.
    pub fn finish(mut self, mut metadata: Metadata) -> Result<StagedBundle, BundleError> {
        metadata.name = self.name.clone();
        metadata.files = std::mem::take(&mut self.files);
        write_synced(&self.tmp.join(METADATA_FILE), &metadata.to_bytes())?;
        let mut dirs: Vec<PathBuf> = metadata
            .files
            .keys()
            .filter_map(|rel| self.tmp.join(rel).parent().map(Path::to_path_buf))
            .collect();
        dirs.sort();
        dirs.dedup();
        for d in dirs {
            sync_dir(&d)?;
        }
        sync_dir(&self.tmp)?;
        self.keep = true;
        Ok(StagedBundle {
            out: self.out.clone(),
            tmp: self.tmp.clone(),
            target: self.target(),
            metadata,
            committed: false,
        })
    }
}

impl Drop for BundleWriter {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// A complete bundle in its staging folder. Dropping it without [`StagedBundle::commit`]
/// removes it.
pub struct StagedBundle {
    out: PathBuf,
    tmp: PathBuf,
    target: PathBuf,
    metadata: Metadata,
    committed: bool,
}

impl StagedBundle {
    /// The metadata as written.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Where the bundle goes on commit.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Renames the staging folder into place. An existing bundle there is an error
    /// unless `replace`, in which case it is moved aside first and removed after.
    pub fn commit(mut self, replace: bool) -> Result<PathBuf, BundleError> {
        let exists = self.target.symlink_metadata().is_ok();
        if exists && !replace {
            return Err(BundleError::Exists {
                path: self.target.clone(),
            });
        }
        let name = self
            .target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let old = self.out.join(format!("{OLD_PREFIX}{name}"));
        if exists {
            if old.symlink_metadata().is_ok() {
                std::fs::remove_dir_all(&old).map_err(|e| BundleError::io(&old, e))?;
            }
            std::fs::rename(&self.target, &old).map_err(|e| BundleError::io(&self.target, e))?;
        }
        if let Err(e) = std::fs::rename(&self.tmp, &self.target) {
            if exists {
                let _ = std::fs::rename(&old, &self.target);
            }
            return Err(BundleError::io(&self.target, e));
        }
        self.committed = true;
        if exists {
            std::fs::remove_dir_all(&old).map_err(|e| BundleError::io(&old, e))?;
        }
        sync_dir(&self.out)?;
        Ok(self.target.clone())
    }
}

impl Drop for StagedBundle {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::Kind;

    #[test]
    fn staging_is_removed_unless_committed() {
        let out = tempfile::tempdir().unwrap();
        let mut w = BundleWriter::create(out.path(), "b").unwrap();
        w.add_file("tokenizer/t.json", b"{}").unwrap();
        let tmp = w.dir().to_path_buf();
        assert!(tmp.join("tokenizer/t.json").exists());
        drop(w);
        assert!(!tmp.exists());

        let mut w = BundleWriter::create(out.path(), "b").unwrap();
        w.add_file("config.json", b"{}").unwrap();
        let staged = w.finish(Metadata::new(Kind::Vision, "b")).unwrap();
        assert_eq!(staged.metadata().files.len(), 1);
        drop(staged);
        assert!(std::fs::read_dir(out.path()).unwrap().next().is_none());

        let w = BundleWriter::create(out.path(), "b").unwrap();
        let path = w
            .finish(Metadata::new(Kind::Vision, "b"))
            .unwrap()
            .commit(false)
            .unwrap();
        assert!(path.join(METADATA_FILE).exists());
        assert!(BundleWriter::ensure_absent(out.path(), "b").is_err());
        let w = BundleWriter::create(out.path(), "b").unwrap();
        let e = w
            .finish(Metadata::new(Kind::Vision, "b"))
            .unwrap()
            .commit(false)
            .unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        let mut w = BundleWriter::create(out.path(), "b").unwrap();
        w.add_file("new.txt", b"x").unwrap();
        let path = w
            .finish(Metadata::new(Kind::Vision, "b"))
            .unwrap()
            .commit(true)
            .unwrap();
        assert!(path.join("new.txt").exists());
        let names: Vec<_> = std::fs::read_dir(out.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("b")]);
    }
}
