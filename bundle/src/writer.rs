//! Staging and committing a bundle folder atomically.
//!
//! A bundle is written into its own folder inside a run's staging folder (see
//! [`crate::Staging`]: the output folder is locked for the run through its
//! `.q3vl-lock` file, the staging folder is unique to it) and only renamed to `<out>/<name>` once every file is written and
//! synced, so an interrupted or failed run never leaves a folder that looks like a
//! bundle. Dropping a writer (on an error, or on Ctrl-C) removes its folder.
//!
//! Committing over an existing folder is allowed only when it is a q3vl bundle of the
//! same kind ([`ensure_replaceable`]): `--force` replaces bundles, never a user's
//! folder that happens to carry a bundle's name.

use crate::error::BundleError;
use crate::metadata::{FileEntry, Kind, Metadata, FORMAT_TAG};
use crate::names::METADATA_FILE;
use crate::st_writer::{write_synced, WrittenFile};
use crate::staging::{sync_dir, Staging};
use q3vl_model::error::printable;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A bundle being written into its staging folder.
pub struct BundleWriter {
    staging: Staging,
    name: String,
    tmp: PathBuf,
    files: BTreeMap<String, FileEntry>,
    keep: bool,
}

impl BundleWriter {
    /// Starts bundle `out/name` alone: claims `out` (see [`Staging::begin`]) for as long
    /// as the writer, and then the staged bundle, live.
    pub fn create(out: &Path, name: &str) -> Result<Self, BundleError> {
        Self::create_in(&Staging::begin(out)?, name)
    }

    /// Starts bundle `name` in the staging folder of `staging`; it will be committed to
    /// `staging.out()/name`.
    pub fn create_in(staging: &Staging, name: &str) -> Result<Self, BundleError> {
        // `~` marks entry claims' staging names (see `names::ENTRY_END`); refused here,
        // before anything is written, rather than at install.
        let plain = !name.is_empty()
            && !name.starts_with('.')
            && !name.contains(['/', '\\', crate::names::ENTRY_END])
            && !name.chars().any(char::is_control);
        if !plain {
            return Err(BundleError::Format {
                path: staging.out().join(name),
                msg: "is not a plain folder name for a bundle".into(),
            });
        }
        let tmp = staging.dir().join(name);
        std::fs::create_dir(&tmp).map_err(|e| BundleError::io(&tmp, e))?;
        Ok(BundleWriter {
            staging: staging.clone(),
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
        self.staging.out().join(&self.name)
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
        let bytes = metadata.to_bytes();
        write_synced(&self.tmp.join(METADATA_FILE), &bytes)?;
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
            staging: self.staging.clone(),
            tmp: self.tmp.clone(),
            target: self.target(),
            name: self.name.clone(),
            metadata,
            metadata_sha256: hex::encode(Sha256::digest(&bytes)),
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
    staging: Staging,
    tmp: PathBuf,
    target: PathBuf,
    name: String,
    metadata: Metadata,
    metadata_sha256: String,
    committed: bool,
}

impl StagedBundle {
    /// The metadata as written.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// The sha256 of the `metadata.json` as written (what a language bundle records
    /// as its `companion_sha256`).
    pub fn metadata_sha256(&self) -> &str {
        &self.metadata_sha256
    }

    /// Where the bundle goes on commit.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Renames the staged bundle into place. Something already there is an error unless
    /// it is a bundle of the same kind ([`ensure_replaceable`]) and `replace` is set.
    pub fn commit(mut self, replace: bool) -> Result<PathBuf, BundleError> {
        if self.target.symlink_metadata().is_ok() {
            ensure_replaceable(&self.target, self.metadata.kind)?;
            if !replace {
                return Err(BundleError::Exists {
                    path: self.target.clone(),
                });
            }
        }
        let path = self.staging.install(&self.name)?;
        self.committed = true;
        Ok(path)
    }
}

impl Drop for StagedBundle {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Fails unless `target` is a q3vl bundle folder of `kind`: a real folder (not a link)
/// whose `metadata.json` carries q3vl's format tag and that kind. Anything else is a
/// folder q3vl did not write, which it must not delete, even under `--force`.
pub fn ensure_replaceable(target: &Path, kind: Kind) -> Result<(), BundleError> {
    let is_dir = target.symlink_metadata().is_ok_and(|m| m.is_dir());
    let want = serde_json::to_value(kind).expect("kind serializes");
    let meta = target.join(METADATA_FILE);
    let bytes = is_dir
        .then(|| q3vl_model::input::read_regular(&meta).ok())
        .flatten();
    match bytes.map(|b| serde_json::from_slice::<serde_json::Value>(&b)) {
        Some(Ok(v)) if v["format"] == FORMAT_TAG && v["kind"] == want => return Ok(()),
        // Not another tool's folder but a bundle whose metadata was cut short: what it
        // was cannot be told, so q3vl does not delete it.
        Some(Err(e)) => {
            return Err(BundleError::Format {
                path: meta,
                msg: format!(
                    "does not parse ({e}): a damaged bundle; q3vl cannot tell what it held, \
                     so remove {} by hand",
                    printable(target.display())
                ),
            })
        }
        _ => {}
    }
    Err(BundleError::Format {
        path: target.to_path_buf(),
        msg: format!(
            "is not a q3vl {} bundle (no metadata.json with format {FORMAT_TAG:?} and kind {want}); \
             refusing to replace it, even with --force: move it away or choose another --out",
            want.as_str().unwrap_or_default()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<std::ffi::OsString> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    }

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
        assert_eq!(names(out.path()), [".q3vl-lock"]);

        let w = BundleWriter::create(out.path(), "b").unwrap();
        let staged = w.finish(Metadata::new(Kind::Vision, "b")).unwrap();
        let digest = staged.metadata_sha256().to_string();
        let path = staged.commit(false).unwrap();
        let written = crate::sha256_file(&path.join(METADATA_FILE)).unwrap();
        assert_eq!(written.sha256, digest);
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
        assert_eq!(names(out.path()), vec![".q3vl-lock", "b"]);
    }

    #[test]
    fn two_bundles_of_one_run_share_one_claim() {
        let out = tempfile::tempdir().unwrap();
        let st = Staging::begin(out.path()).unwrap();
        let a = BundleWriter::create_in(&st, "a").unwrap();
        let b = BundleWriter::create_in(&st, "b").unwrap();
        assert_eq!(a.dir().parent(), Some(st.dir()));
        assert!(BundleWriter::create(out.path(), "c").is_err(), "locked");
        let a = a.finish(Metadata::new(Kind::Vision, "a")).unwrap();
        let b = b.finish(Metadata::new(Kind::Language, "b")).unwrap();
        a.commit(false).unwrap();
        b.commit(false).unwrap();
        let dir = st.dir().to_path_buf();
        drop(st);
        assert!(!dir.exists());
        assert_eq!(names(out.path()), vec![".q3vl-lock", "a", "b"]);
        for bad in ["", ".hidden", "a/b", "x\ny", "a~"] {
            let st = Staging::begin(out.path()).unwrap();
            assert!(BundleWriter::create_in(&st, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn force_replaces_only_bundles_of_the_same_kind() {
        let out = tempfile::tempdir().unwrap();
        let user = out.path().join("b");
        std::fs::create_dir(&user).unwrap();
        std::fs::write(user.join("notes.txt"), b"mine").unwrap();
        let try_commit = |kind| {
            let w = BundleWriter::create(out.path(), "b").unwrap();
            w.finish(Metadata::new(kind, "b")).unwrap().commit(true)
        };
        let e = try_commit(Kind::Vision).unwrap_err().to_string();
        assert!(e.contains("is not a q3vl vision bundle"), "{e}");
        assert!(e.contains(&user.display().to_string()), "{e}");
        assert_eq!(std::fs::read(user.join("notes.txt")).unwrap(), b"mine");
        // A bundle of the other kind under this name is not replaced either.
        std::fs::write(
            user.join(METADATA_FILE),
            Metadata::new(Kind::Language, "b").to_bytes(),
        )
        .unwrap();
        let e = try_commit(Kind::Vision).unwrap_err().to_string();
        assert!(e.contains("is not a q3vl vision bundle"), "{e}");
        assert!(user.join("notes.txt").exists());
        // A file in the way is not a bundle.
        std::fs::remove_dir_all(&user).unwrap();
        std::fs::write(&user, b"file").unwrap();
        assert!(try_commit(Kind::Vision).is_err());
        assert_eq!(std::fs::read(&user).unwrap(), b"file");
        // A bundle of the same kind is.
        std::fs::remove_file(&user).unwrap();
        try_commit(Kind::Language).unwrap();
        try_commit(Kind::Language).unwrap();
        assert_eq!(names(out.path()), vec![".q3vl-lock", "b"]);
    }

    #[test]
    fn a_bundle_with_a_truncated_metadata_is_named_damaged() {
        let out = tempfile::tempdir().unwrap();
        let b = out.path().join("b");
        std::fs::create_dir(&b).unwrap();
        let bytes = Metadata::new(Kind::Language, "b").to_bytes();
        std::fs::write(b.join(METADATA_FILE), &bytes[..bytes.len() / 2]).unwrap();
        let e = ensure_replaceable(&b, Kind::Language)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&b.join(METADATA_FILE).display().to_string()),
            "{e}"
        );
        assert!(e.contains("does not parse"), "{e}");
        assert!(e.contains("damaged bundle"), "{e}");
        assert!(e.contains("by hand"), "{e}");
        assert!(!e.contains("is not a q3vl"), "{e}");
    }
}
