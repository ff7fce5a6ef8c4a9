//! sha256 of whole files, for `metadata.json` and for checking a bundle against it.

use crate::error::BundleError;
use crate::metadata::FileEntry;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

/// Size and sha256 of a file, read in 8 MiB pieces (memory stays flat for any size).
pub fn sha256_file(path: &Path) -> Result<FileEntry, BundleError> {
    let mut f = q3vl_model::input::open_regular(path).map_err(|e| BundleError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 8 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| BundleError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok(FileEntry {
        sha256: hex::encode(h.finalize()),
        size,
    })
}

/// The result of checking one bundle file against `metadata.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileCheck {
    /// The file, relative to the bundle folder.
    pub file: String,
    /// What `metadata.json` records.
    pub expected: FileEntry,
    /// What is on disk (`None` when the file could not be read).
    pub found: Option<FileEntry>,
    /// Why the file could not be read.
    pub error: Option<String>,
}

impl FileCheck {
    /// Whether the file is present with the recorded size and digest.
    pub fn ok(&self) -> bool {
        self.found.as_ref() == Some(&self.expected)
    }

    /// Why the file fails the check (`None` when it passes): the read error, or its
    /// digest against the recorded one.
    pub fn problem(&self) -> Option<String> {
        if self.ok() {
            return None;
        }
        Some(match (&self.found, &self.error) {
            (_, Some(e)) => e.clone(),
            (Some(f), None) => format!(
                "sha256 {}, metadata.json says {}",
                f.sha256, self.expected.sha256
            ),
            (None, None) => "unreadable".into(),
        })
    }
}
