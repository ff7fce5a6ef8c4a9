//! `verification.json`: the stamp `q3vl verify --stamp` writes beside a bundle's
//! `metadata.json` when, and only when, every gate passed. It binds the gate results
//! to the hashes of the files they were computed on, so any later change to a
//! verified file makes the stamp invalid.

use crate::checksum::sha256_file;
use crate::error::BundleError;
use crate::metadata::{FileEntry, Metadata};
use crate::names::METADATA_FILE;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The stamp's file name inside a bundle folder.
pub const STAMP_FILE: &str = "verification.json";
/// The stamp's format tag.
pub const STAMP_FORMAT: &str = "q3vl-verification/1";

/// The contents of `verification.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Stamp {
    /// Always [`STAMP_FORMAT`].
    pub format: String,
    /// The verifier that wrote it (`q3vl 0.1.0 (commit)`).
    pub tool: String,
    /// The gates file used, verbatim.
    pub gates: serde_json::Value,
    /// Every gate result, per trace.
    pub results: serde_json::Value,
    /// Trace file name → sha256 of the trace.
    pub traces: BTreeMap<String, String>,
    /// Every verified file of this bundle (relative path → size and sha256),
    /// `metadata.json` included.
    pub files: BTreeMap<String, FileEntry>,
}

/// Whether a bundle carries a stamp that still matches its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StampStatus {
    /// No `verification.json`.
    Missing,
    /// Present and every checked file matches.
    Valid,
    /// Present but something changed (the reason names the file).
    Invalid(String),
}

impl std::fmt::Display for StampStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StampStatus::Missing => write!(f, "not verified (no {STAMP_FILE})"),
            StampStatus::Valid => write!(f, "verified ({STAMP_FILE} matches)"),
            StampStatus::Invalid(why) => write!(f, "verification stamp INVALID: {why}"),
        }
    }
}

/// The files a stamp covers: `metadata.json` and every file it lists.
pub fn covered_files(dir: &Path) -> Result<Vec<String>, BundleError> {
    let m = Metadata::read(dir)?;
    let mut files: Vec<String> = m.files.keys().cloned().collect();
    files.push(METADATA_FILE.to_string());
    files.sort();
    Ok(files)
}

/// Hashes every covered file of a bundle.
pub fn hash_covered(dir: &Path) -> Result<BTreeMap<String, FileEntry>, BundleError> {
    covered_files(dir)?
        .into_iter()
        .map(|f| Ok((f.clone(), sha256_file(&dir.join(&f))?)))
        .collect()
}

/// Writes `stamp` into `dir` atomically (a temporary file renamed into place).
pub fn write_stamp(dir: &Path, stamp: &Stamp) -> Result<(), BundleError> {
    let tmp = dir.join(format!(".{STAMP_FILE}.tmp"));
    let text = serde_json::to_string_pretty(stamp).expect("stamp serialises");
    std::fs::write(&tmp, text).map_err(|e| BundleError::io(&tmp, e))?;
    let dst = dir.join(STAMP_FILE);
    std::fs::rename(&tmp, &dst).map_err(|e| BundleError::io(&dst, e))
}

/// Removes a stamp (a failed verification must not leave an old one standing).
pub fn remove_stamp(dir: &Path) -> Result<(), BundleError> {
    let p = dir.join(STAMP_FILE);
    match std::fs::remove_file(&p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(BundleError::io(&p, e)),
    }
}

/// Reads the stamp, if any.
pub fn read_stamp(dir: &Path) -> Result<Option<Stamp>, BundleError> {
    let p = dir.join(STAMP_FILE);
    if !p.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).map_err(|e| BundleError::io(&p, e))?;
    let s: Stamp = serde_json::from_str(&text).map_err(|e| BundleError::Format {
        path: p.clone(),
        msg: format!("not a valid stamp: {e}"),
    })?;
    if s.format != STAMP_FORMAT {
        return Err(BundleError::Format {
            path: p,
            msg: format!("format {:?} is not {STAMP_FORMAT:?}", s.format),
        });
    }
    Ok(Some(s))
}

/// Checks a bundle's stamp. `full` re-hashes every covered file; otherwise only
/// `metadata.json` is hashed (it records every other file's digest) and the other
/// files' sizes are compared — cheap enough for every `q3vl run`.
pub fn check_stamp(dir: &Path, full: bool) -> StampStatus {
    let stamp = match read_stamp(dir) {
        Ok(None) => return StampStatus::Missing,
        Ok(Some(s)) => s,
        Err(e) => return StampStatus::Invalid(e.to_string()),
    };
    let covered = match covered_files(dir) {
        Ok(c) => c,
        Err(e) => return StampStatus::Invalid(e.to_string()),
    };
    let stamped: Vec<&String> = stamp.files.keys().collect();
    if stamped != covered.iter().collect::<Vec<_>>() {
        return StampStatus::Invalid("the bundle's file list changed since it was verified".into());
    }
    for (rel, want) in &stamp.files {
        let p = dir.join(rel);
        if full || rel == METADATA_FILE {
            match sha256_file(&p) {
                Ok(found) if &found == want => {}
                Ok(_) => {
                    return StampStatus::Invalid(format!("{rel} changed since it was verified"))
                }
                Err(e) => return StampStatus::Invalid(e.to_string()),
            }
        } else {
            match std::fs::metadata(&p) {
                Ok(m) if m.len() == want.size => {}
                Ok(_) => {
                    return StampStatus::Invalid(format!(
                        "{rel} changed size since it was verified"
                    ))
                }
                Err(e) => return StampStatus::Invalid(format!("{rel}: {e}")),
            }
        }
    }
    StampStatus::Valid
}
